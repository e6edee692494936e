"""Patterns, the sparsifier, schedules and Dropback (no data needed; all seeded).

Every pruned layer must have exactly the asked number of zero groups, whole blocks must be
zero and nothing else, N:M must hold in every group, schedules must only ever raise the
sparsity, and Dropback must track exactly its budget.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tilewright.sw.prune.dropback import DropbackSparsifier, StreamingQuantile, select_budget
from tilewright.sw.prune.patterns import (
    BlockPattern,
    NMPattern,
    UnstructuredPattern,
    parse_pattern,
    pattern_from_dict,
)
from tilewright.sw.prune.schedule import CubicSL, IterativeSL, iterative_levels
from tilewright.sw.prune.sensitivity import choose_sparsities, sensitivity_scan
from tilewright.sw.prune.sparsifier import (
    MaskError,
    PatternSparsifier,
    compute_mask,
    format_report,
    zero_groups,
)
from tilewright.sw.quantize import block_mask

SEEDS = [0, 1, 2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is fastest and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(seed: int) -> nn.Sequential:
    """Convs and FCs of awkward shapes: a dense first conv, padded layers, a 1x1, a 5x5."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),          # first conv: dense
        nn.Conv2d(16, 32, 3),         # divides 8x8
        nn.Conv2d(32, 20, 1),         # Cout 20: padded
        nn.Conv2d(20, 24, 5),         # Cin 20: padded, 5x5 taps
        nn.Flatten(),
        nn.Linear(24, 64),
        nn.Linear(64, 10),            # Cout 10: padded
    )


PRUNED = ["1", "2", "3", "5", "6"]


# Patterns ---------------------------------------------------------------------------------

def test_parse_pattern() -> None:
    assert parse_pattern("8x8") == BlockPattern(8, 8)
    assert parse_pattern("block16x4") == BlockPattern(16, 4)
    assert parse_pattern("2:4") == NMPattern(2, 4)
    assert parse_pattern("unstructured") == UnstructuredPattern()
    for p in (BlockPattern(4, 16), NMPattern(1, 8), UnstructuredPattern()):
        assert pattern_from_dict(p.as_dict()) == p
    with pytest.raises(ValueError, match="accepted"):
        parse_pattern("8by8")
    with pytest.raises(ValueError, match="n <= m"):
        NMPattern(5, 4)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("score", ["l2", "l1", "variance"])
def test_block_scores_match_a_loop(seed: int, score: str) -> None:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((20, 13, 3, 3))
    p = BlockPattern(8, 4)
    got = p.scores(torch.from_numpy(w), score).numpy()
    for i in range(3):
        for j in range(4):
            blk = w[i * 8:(i + 1) * 8, j * 4:(j + 1) * 4]
            full = 8 * 4 * 9 / blk.size     # edge blocks are scored as full blocks
            want = {"l2": np.sqrt((blk ** 2).sum() * full), "l1": np.abs(blk).sum() * full,
                    "variance": blk.var()}[score]
            assert math.isclose(got[i, j], want, rel_tol=1e-9, abs_tol=1e-12), \
                f"seed {seed}: block ({i}, {j}) {score} {got[i, j]} != {want}"


# The block sparsifier ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("level", [0.25, 0.5, 0.75, 0.9])
def test_block_masks_shape_and_exact_sparsity(seed: int, level: float) -> None:
    model = _net(seed)
    sp = PatternSparsifier(BlockPattern(8, 8), level)
    sp.prepare(model, None)
    sp.step()
    masks = sp.masks()
    assert sorted(masks) == PRUNED, f"seed {seed}: pruned {sorted(masks)}"
    for name, m in masks.items():
        w = model.get_submodule(name).weight
        assert m.shape == (-(-w.shape[0] // 8), -(-w.shape[1] // 8)), f"seed {seed}: {name}"
        assert int((~m).sum()) == zero_groups(level, m.numel()), \
            f"seed {seed} level {level}: {name} has {int((~m).sum())} zero blocks of {m.numel()}"
    rep = {r.name: r for r in sp.report()}
    assert not rep["0"].pruned and "first convolution" in rep["0"].reason
    assert "padded logically" in rep["2"].reason and "padded logically" in rep["6"].reason
    assert rep["1"].reason == ""
    assert "5 of 6 conv/FC layers pruned" in format_report(sp.report())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("score", ["l2", "l1", "variance"])
def test_whole_blocks_zero_and_nothing_else(seed: int, score: str) -> None:
    model = _net(seed)
    sp = PatternSparsifier(BlockPattern(8, 8), 0.5, score=score)
    sp.prepare(model, None)
    sp.step()
    scores = {n: BlockPattern(8, 8).scores(model.get_submodule(n).weight, score)
              for n in PRUNED}
    sp.squash_mask()
    for name, m in sp.masks().items():
        w = model.get_submodule(name).weight.detach()
        assert not torch.nn.utils.parametrize.is_parametrized(model.get_submodule(name))
        keep = BlockPattern(8, 8).expand(m, w.shape)
        assert bool((w[~keep] == 0).all()), f"seed {seed}: {name} pruned block not zero"
        assert bool((w[keep] != 0).all()), f"seed {seed}: {name} a kept weight is zero"
        # the project's own block_mask agrees (8x8, same layout)
        assert np.array_equal(block_mask(w.numpy(), 8), m.numpy()), f"seed {seed}: {name}"
        # pruned blocks are the lowest-scoring ones
        s = scores[name]
        assert float(s[~m].max()) <= float(s[m].min()), f"seed {seed}: {name} ranking"
    assert bool((model[0].weight != 0).all()), f"seed {seed}: first conv was pruned"


@pytest.mark.parametrize("seed", SEEDS)
def test_non_square_blocks_and_pad_dense(seed: int) -> None:
    model = _net(seed)
    sp = PatternSparsifier(BlockPattern(16, 4), 0.5, pad="dense")
    sp.prepare(model, None)
    sp.step()
    masks = sp.masks()
    # 16x4: Cout 20, 24 and 10 (layers 2, 3, 6) do not divide 16 -> dense
    assert sorted(masks) == ["1", "5"], f"seed {seed}: {sorted(masks)}"
    for n in ("2", "3", "6"):
        assert "left dense" in sp.dense_layers[n], f"seed {seed}: {sp.dense_layers}"
    for name, m in masks.items():
        w = model.get_submodule(name).weight
        assert m.shape == (w.shape[0] // 16, w.shape[1] // 4)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (1, 3)])
def test_nm_holds_in_every_group(seed: int, nm: tuple[int, int]) -> None:
    model = _net(seed)
    pat = NMPattern(*nm)
    sp = PatternSparsifier(pat, None)
    sp.prepare(model, None)
    sp.step()
    sp.squash_mask()
    for name in PRUNED:
        w = model.get_submodule(name).weight.detach()
        w4 = w if w.dim() == 4 else w[:, :, None, None]
        cin = w4.shape[1]
        for c0 in range(0, cin, pat.m):
            grp = w4[:, c0:c0 + pat.m]
            nnz = (grp != 0).sum(1)
            full = grp.shape[1] == pat.m
            want = pat.n if full else min(pat.n, grp.shape[1])
            assert bool((nnz == want).all()), \
                f"seed {seed} {pat}: {name} channels {c0}.. keep {nnz.unique().tolist()}"
        assert pat.holds(sp.masks()[name])


@pytest.mark.parametrize("seed", SEEDS)
def test_unstructured_exact_count(seed: int) -> None:
    model = _net(seed)
    sp = PatternSparsifier(UnstructuredPattern(), 0.8)
    sp.prepare(model, None)
    sp.step()
    for name, m in sp.masks().items():
        assert int((~m).sum()) == zero_groups(0.8, m.numel()), f"seed {seed}: {name}"


@pytest.mark.parametrize("seed", SEEDS)
def test_global_ranking(seed: int) -> None:
    model = _net(seed)
    sp = PatternSparsifier(BlockPattern(8, 8), 0.6, ranking="global")
    sp.prepare(model, None)
    sp.step()
    total = zero = 0.0
    biggest = 0.0
    for r in sp.report():
        if r.pruned:
            n = math.prod(r.weight_shape)
            total += n
            zero += r.weight_sparsity * n
            biggest = max(biggest, n / r.groups * 1.0)
            assert r.zero_groups < r.groups, f"seed {seed}: global ranking emptied {r.name}"
    # zeroed weights are the target within one block
    assert zero <= 0.6 * total + 1e-6 and zero > 0.6 * total - 8 * 8 * 25, \
        f"seed {seed}: {zero / total:.4f} of the weights zeroed, target 0.6"
    with pytest.raises(ValueError, match="one sparsity"):
        PatternSparsifier(BlockPattern(), 0.5, ranking="global").prepare(
            _net(seed), {"1": 0.5, "2": 0.7})


def test_per_layer_config_and_errors() -> None:
    model = _net(0)
    sp = PatternSparsifier(BlockPattern(8, 8), 0.5)
    sp.prepare(model, {"1": 0.25, "5": 0.75})
    sp.step()
    s = sp.sparsity()
    assert s == {"1": 0.25, "5": 0.75}
    assert sp.dense_layers["3"] == "not in the sparsity configuration"
    with pytest.raises(ValueError, match=r"layer '0'.*first convolution.*dense_first_conv"):
        PatternSparsifier().prepare(_net(0), {"0": 0.5})
    with pytest.raises(ValueError, match="'nope'"):
        PatternSparsifier().prepare(_net(0), {"nope": 0.5})
    with pytest.raises(ValueError, match="Flatten"):
        PatternSparsifier().prepare(_net(0), {"4": 0.5})
    with pytest.raises(ValueError, match=r"layer 1: sparsity_level"):
        PatternSparsifier().prepare(_net(0), {"1": 1.5})
    with pytest.raises(ValueError, match=r"accepted: 0 or 0\.5"):
        PatternSparsifier(NMPattern(2, 4), 0.3)


@pytest.mark.parametrize("seed", SEEDS)
def test_sparsifier_state_dict_round_trip_and_errors(seed: int) -> None:
    a = _net(seed)
    sp = PatternSparsifier(BlockPattern(8, 8), 0.5)
    sp.prepare(a, None)
    sp.step()
    sd = sp.state_dict()
    b = _net(seed + 10)
    sp2 = PatternSparsifier(BlockPattern(8, 8), 0.5)
    sp2.prepare(b, None)
    sp2.load_state_dict(sd)
    for n, m in sp.masks().items():
        assert torch.equal(sp2.masks()[n], m), f"seed {seed}: {n}"
    bad = sp.state_dict()
    bad["state"]["3.weight"]["mask"] = torch.ones(2, 2, dtype=torch.bool)
    sp3 = PatternSparsifier(BlockPattern(8, 8), 0.5)
    sp3.prepare(_net(seed), None)
    with pytest.raises(MaskError, match=r"layer 3: mask shape \(2, 2\).*expected \(3, 3\)"):
        sp3.load_state_dict(bad)
    with pytest.raises(MaskError, match="pattern"):
        sp4 = PatternSparsifier(BlockPattern(4, 4), 0.5)
        sp4.prepare(_net(seed), None)
        sp4.load_state_dict(sd)


# Schedules --------------------------------------------------------------------------------

@pytest.mark.parametrize("target,fraction", [(0.5, 0.2), (0.75, 0.2), (0.9, 0.3), (0.5, 0.05)])
def test_iterative_levels(target: float, fraction: float) -> None:
    lv = iterative_levels(target, fraction)
    assert lv[-1] == target
    prev = 0.0
    for s in lv:
        assert s >= prev
        # at most `fraction` of what remained is removed
        assert (s - prev) <= fraction * (1.0 - prev) + 1e-12
        prev = s
    assert len(lv) == math.ceil(math.log(1 - target) / math.log(1 - fraction) - 1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_iterative_schedule_monotone_nested_masks(seed: int) -> None:
    model = _net(seed)
    sp = PatternSparsifier(BlockPattern(8, 8), 0.75)
    sp.prepare(model, None)
    sched = IterativeSL(sp, 0.2)
    prev = {n: torch.ones_like(m) for n, m in sp.masks().items()}
    levels = []
    for _ in range(sched.rounds):
        sp.step()
        levels.append(sched.get_last_sl()[0])
        # perturb the weights as fine-tuning would: masks must still only shrink
        with torch.no_grad():
            for n in PRUNED:
                p = model.get_submodule(n).parametrizations.weight.original
                p.add_(0.5 * torch.randn_like(p))
        for n, m in sp.masks().items():
            assert not bool((m & ~prev[n]).any()), f"seed {seed}: {n} revived a block"
            prev[n] = m
        sched.step()
    assert levels == sorted(levels) and levels[-1] == 0.75, f"seed {seed}: {levels}"
    for n, m in sp.masks().items():
        assert int((~m).sum()) == zero_groups(0.75, m.numel()), f"seed {seed}: {n}"


def test_cubic_schedule_monotone() -> None:
    model = _net(0)
    sp = PatternSparsifier(BlockPattern(8, 8), 0.8)
    sp.prepare(model, None)
    sched = CubicSL(sp, init_sl=0.0, init_t=0, delta_t=1, total_t=10)
    levels = []
    for _ in range(14):
        sp.step()
        levels.append(sp.groups[0]["sparsity_level"])
        sched.step()
    assert levels == sorted(levels), levels
    assert levels[0] == 0.0 and math.isclose(levels[-1], 0.8)


# Dropback ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_select_budget_equals_exact_top_k(seed: int) -> None:
    rng = np.random.default_rng(seed)
    s = torch.from_numpy(rng.random(500))
    ones = torch.ones(500, dtype=torch.float64)
    exact = torch.zeros(500, dtype=torch.bool)
    exact[torch.sort(-s, stable=True).indices[:137]] = True
    for tau in (None, 0.0, 0.3, 0.72, 0.9, 2.0):
        got = select_budget(s, ones, 137.0, tau)
        assert torch.equal(got, exact), f"seed {seed}, tau {tau}"


def test_streaming_quantile_tracks() -> None:
    g = torch.Generator().manual_seed(0)
    q = StreamingQuantile(0.5)
    for t in range(300):
        s = torch.rand(1000, generator=g) * (1 + t / 100)      # a drifting distribution
        q.update(s, 250)
    above = int((torch.rand(1000, generator=g) * 4 > q.tau).sum())
    assert 200 <= above <= 300, f"estimate {q.tau}: {above} of 1000 above, target 250"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ranking", ["layer", "global"])
def test_dropback_keeps_exactly_the_budget(seed: int, ranking: str) -> None:
    model = _net(seed)
    db = DropbackSparsifier(BlockPattern(8, 8), 0.6, decay=0.5, decay_every=2,
                            ranking=ranking)
    db.prepare(model, None)
    init = {n: model.get_submodule(n).weight.detach().clone() for n in PRUNED}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    budget = db.budget()
    total_w = sum(model.get_submodule(n).weight.numel() for n in PRUNED)
    for step in range(40):
        x = torch.randn(8, 3, 9, 9, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        db.step()
        if ranking == "layer":
            assert db.tracked() == budget, f"seed {seed} step {step}: {db.tracked()}"
        else:
            kept = sum(float(BlockPattern(8, 8).group_sizes(model.get_submodule(n).weight.shape)
                             [m].sum()) for n, m in db.masks().items())
            assert kept <= 0.4 * total_w + 1e-6, f"seed {seed} step {step}: {kept}"
            assert kept > 0.4 * total_w - 8 * 8 * 25, f"seed {seed} step {step}: {kept}"
        # untracked blocks sit exactly at d * w_init
        for n, m in db.masks().items():
            w = model.get_submodule(n).weight.detach()
            keep = BlockPattern(8, 8).expand(m, w.shape)
            assert torch.allclose(w[~keep], db.decay_factor * init[n][~keep], atol=1e-6), \
                f"seed {seed} step {step}: {n}"
    assert db.decay_factor == 0.0, f"seed {seed}: decay {db.decay_factor} after 40 steps"
    db.squash_mask()
    for n, m in db.masks().items():
        w = model.get_submodule(n).weight.detach()
        keep = BlockPattern(8, 8).expand(m, w.shape)
        assert bool((w[~keep] == 0).all()), f"seed {seed}: {n} not exactly zero"
    assert bool((model[0].weight != 0).all())


def test_dropback_state_round_trip() -> None:
    a = _net(0)
    db = DropbackSparsifier(BlockPattern(8, 8), 0.5)
    db.prepare(a, None)
    with torch.no_grad():
        a[1].weight.add_(1.0)
    db.step()
    sd = db.state_dict()
    b = _net(0)
    db2 = DropbackSparsifier(BlockPattern(8, 8), 0.5)
    db2.prepare(b, None)
    db2.load_state_dict(sd)
    assert db2.steps == 1 and db2.decay_factor == db.decay_factor
    assert all(torch.equal(db2.masks()[n], m) for n, m in db.masks().items())
    del sd["state"]["5.weight"]
    with pytest.raises(MaskError, match="layer 5"):
        db2.load_state_dict(sd)


# Sensitivity ------------------------------------------------------------------------------

def test_sensitivity_scan_and_choice() -> None:
    model = _net(0)
    x = torch.randn(16, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    ref = model(x).detach()

    def evaluate(m: nn.Module) -> float:       # "accuracy": closeness to the dense output
        with torch.no_grad():
            return float(1.0 / (1.0 + (m(x) - ref).pow(2).mean()))

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scan = sensitivity_scan(model, evaluate, BlockPattern(8, 8), (0.5, 0.9))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert sorted(scan.accuracy) == PRUNED and scan.baseline == 1.0
    for accs in scan.accuracy.values():
        assert accs[0] >= accs[1] - 1e-9 and accs[0] <= 1.0
    chosen = choose_sparsities(scan, 0.5)
    removed = sum(scan.group_fraction[n][[0.5, 0.9].index(s)] * scan.weights[n]
                  for n, s in chosen.items() if s > 0)
    assert removed >= 0.5 * sum(scan.weights.values())
    sp = PatternSparsifier(BlockPattern(8, 8))
    sp.prepare(model, {n: s for n, s in chosen.items() if s > 0})
    sp.step()
    with pytest.raises(ValueError, match="out of reach"):
        choose_sparsities(scan, 0.95)


def test_compute_mask_keeps_one_group() -> None:
    w = torch.randn(8, 8, 3, 3)
    m = compute_mask(w, BlockPattern(8, 8), 0.5)
    assert m.shape == (1, 1) and bool(m.all())
    assert not bool(compute_mask(w, BlockPattern(8, 8), 1.0).any())


@pytest.mark.parametrize("seed", SEEDS)
def test_padded_edge_blocks_are_not_pruned_first(seed: int) -> None:
    # a 10-class classifier: block row 1 holds classes 8 and 9 only (2 x 8 weights a block);
    # scored per weight it competes fairly, instead of being pruned whole (two dead classes)
    torch.manual_seed(seed)
    fc = nn.Linear(128, 10)
    m = compute_mask(fc.weight, BlockPattern(8, 8), 0.5)
    assert m.shape == (2, 16)
    assert 3 <= int(m[1].sum()) <= 13, f"seed {seed}: edge row keeps {int(m[1].sum())} of 16"


@pytest.mark.parametrize("seed", SEEDS)
def test_keep_rows(seed: int) -> None:
    model = _net(seed)
    sp = PatternSparsifier(BlockPattern(8, 8), 0.75, keep_rows=True)
    sp.prepare(model, None)
    sp.step()
    for name, m in sp.masks().items():
        nzero = zero_groups(0.75, m.numel())
        assert int((~m).sum()) == nzero, f"seed {seed}: {name}"
        if nzero <= m.numel() - m.shape[0]:       # else the exact count wins (layer 1: 4x2)
            assert bool(m.any(1).all()), f"seed {seed}: {name} lost a whole block row"
        else:
            assert int(m.any(1).sum()) == m.numel() - nzero, f"seed {seed}: {name}"
    # Dropback keeps rows by default, with the exact budget; here the last FC row (the two
    # classes 8 and 9) gets almost no gradient and would otherwise be untracked at once
    model = _net(seed)
    with torch.no_grad():
        model[6].weight[8:].mul_(1e-3)
    db = DropbackSparsifier(BlockPattern(8, 8), 0.75, decay_every=1)
    db.prepare(model, None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    for _ in range(10):
        loss = model(torch.randn(8, 3, 9, 9, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        db.step()
        assert db.tracked() == db.budget(), f"seed {seed}"
        for name, m in db.masks().items():
            if db.budget()[name] >= m.shape[0]:
                assert bool(m.any(1).all()), f"seed {seed}: Dropback untracked a row of {name}"
        assert bool(db.masks()["6"][1].any()), f"seed {seed}: classes 8 and 9 cut off"
