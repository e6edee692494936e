"""The network compiler (issue 5): pruning, the DDR memory plan, whole networks compiled and
verified on the overlay model against the integer PyTorch oracle, the CLI, and a reduced
network run layer by layer on the RTL."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch

from tilewright.hw.config import load_config
from tilewright.sim.golden import DeadlockError
from tilewright.sw.cli import main
from tilewright.sw.graph import import_model
from tilewright.sw.netcompile import (
    CompileError,
    block_prune,
    compile_network,
    estimate_layer,
    find_fusions,
    load_model,
    plan_memory,
    verify_network,
)
from tilewright.sw.quantize import block_mask

TINY = "tilewright.sw.testnets:tiny_resnet"
TINY_VGG = "tilewright.sw.testnets:tiny_vgg"


def _cfg(name: str):
    return load_config(f"overlay_configs/{name}.yaml")


def _graph(spec: str = TINY):
    net, shape, _ = load_model(spec, seed=0)
    return import_model(net, shape)


def test_block_prune_exact_counts_first_conv_dense():
    g = _graph()
    got = block_prune(g, 0.5, block=8)
    convs = [n for n in g if n.kind in ("conv", "linear")]
    assert got[convs[0].name] == 0.0
    for n in convs:
        w = n.weight.detach().numpy()
        m = block_mask(w if w.ndim == 4 else w[:, :, None, None], 8)
        want = 0 if n is convs[0] else int(np.floor(0.5 * m.size + 0.5))
        assert m.size - m.sum() == want, n.name
    # the kept blocks are the largest by L2
    n = convs[1]
    w = n.weight.detach().to(torch.float64)
    g2 = _graph()
    w0 = g2[n.name].weight.detach().to(torch.float64)
    norms = w0.reshape(w0.shape[0] // 8, 8, w0.shape[1] // 8, 8, -1).pow(2).sum((1, 3, 4))
    kept = w.reshape(w.shape[0] // 8, 8, w.shape[1] // 8, 8, -1).abs().sum((1, 3, 4)) > 0
    assert norms[kept].min() >= norms[~kept].max()


def test_block_prune_linear_after_flatten_uses_conv_blocks():
    g = _graph(TINY_VGG)
    block_prune(g, 0.5, block=8)
    fc = g["classifier.0"]
    w = fc.weight.detach().numpy().reshape(64, 32, 4, 4)
    m = block_mask(w, 8)                                    # 8 x 4x4 taps x 8 blocks
    assert m.size - m.sum() == m.size // 2


def _overlap(a0: int, n0: int, a1: int, n1: int) -> bool:
    return a0 < a1 + n1 and a1 < a0 + n0


def test_memory_plan_concat_in_place_and_no_live_overlap():
    g = _graph()
    plan = plan_memory(g, 8)
    cat = g["cat"]
    off = plan.base["cat"]
    for t in cat.inputs:                 # each branch writes its slice of the concat buffer
        assert plan.base[t] == off
        off += plan.words[t]
    assert plan.base["flatten"] == plan.base[g["flatten"].inputs[0]]
    assert plan.arena_words < plan.unshared_words      # buffers are shared
    # tensors alive at the same time never overlap (unless one lies inside the other)
    pos = {g.input_name: -1} | {n.name: i for i, n in enumerate(g.nodes)}
    life = {}
    for t in plan.base:
        users = [pos[u] for u in g.users(t)]
        life[t] = (pos[t], max(users, default=len(g.nodes)))
    names = list(plan.base)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            la, lb = life[a], life[b]
            if la[1] < lb[0] or lb[1] < la[0]:
                continue
            if not _overlap(plan.base[a], plan.words[a], plan.base[b], plan.words[b]):
                continue
            inside = (plan.base[b] >= plan.base[a] and plan.base[b] + plan.words[b]
                      <= plan.base[a] + plan.words[a]) or \
                     (plan.base[a] >= plan.base[b] and plan.base[a] + plan.words[a]
                      <= plan.base[b] + plan.words[b])
            assert inside, f"{a} and {b} are alive together and overlap"


@pytest.mark.parametrize("cfg_name,spec,sparsity", [
    ("tiny-2x2", TINY, 0.0), ("tiny-2x2", TINY, 0.5), ("tiny-2x3", TINY, 0.5),
    ("tiny-2x2", TINY_VGG, 0.5), ("aie2-2x2", TINY, 0.5), ("aie2-1x1", TINY_VGG, 0.0)])
def test_network_verifies_bit_exact(cfg_name, spec, sparsity):
    cfg = _cfg(cfg_name)
    cn = compile_network(spec, cfg, sparsity=sparsity, seed=1)
    checks, _ = verify_network(cn, seed=1)
    bad = [c for c in checks if not c.ok]
    assert not bad, f"{cfg_name} {spec} S={sparsity} seed=1: {bad}"
    kinds = {c.kind for c in checks}
    assert {"conv", "linear"} <= kinds
    s = cn.summary()
    assert s["cycles"] == sum(cl.cycles for cl in cn.layers) > 0
    assert s["time_ms"] == pytest.approx(s["cycles"] / (cfg.clock_mhz * 1e3))
    for cl in cn.layers:
        if cl.array is None:
            continue
        assert cl.cycles >= max(cl.compute, cl.ddr) - 1 or cl.sync == 0, cl.name
        # a prefetched layer's weights are read by the layer before
        moved = sum(n for _, pieces in cl.array.jobs[0].prefetch.values()
                    for _, _, n in pieces) * cfg.tile.word_bytes
        assert cl.ddr_bytes + moved >= 0.9 * cl.ddr_bytes_lower_bound, cl.name
    # the model's cycles in verify (data) equal the estimate (timing only)
    by = {c.name: c.cycles for c in checks}
    for cl in cn.layers:
        if cl.array is not None:
            assert by[cl.name] == cl.cycles, cl.name


def test_residual_adds_fuse_into_the_conv_that_feeds_them():
    """tiny_resnet's two conv-fed adds run in a conv's epilogue (the shortcut conv, produced
    last, takes the main path's output as its residual); the add of a concat does not fuse.
    Fused and unfused both verify; fused, the adds need no run and less DDR traffic."""
    g = _graph()
    assert find_fusions(g) == {"add_1": "short.0", "add_2": "res.0"}
    cfg = _cfg("tiny-2x2")
    on = compile_network(TINY, cfg, sparsity=0.5, seed=5)
    off = compile_network(TINY, cfg, sparsity=0.5, seed=5, fuse=False)
    for cn in (on, off):
        checks, _ = verify_network(cn, seed=5)
        assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    by = {cl.name: cl for cl in on.layers}
    assert by["add_1"].array is None and by["add_1"].fused == "short.0"
    assert by["short.0"].tensor == "add_1" and by["res.0"].fused == "add_2"
    assert by["add"].array is not None
    assert {c.kind for c in verify_network(on, seed=5)[0]} >= {"conv+add"}
    # the fused conv writes its add's buffer, which lives while its inputs do
    assert on.plan.base["short.0"] == on.plan.base["add_1"]
    s_on, s_off = on.summary(), off.summary()
    assert s_on["ddr_bytes"] < s_off["ddr_bytes"] and s_on["runs"] < s_off["runs"]


def test_tiny_resnet_covers_every_op_kind():
    g = _graph()
    assert set(g.kinds()) >= {"conv", "linear", "maxpool", "avgpool", "global_avgpool", "add",
                              "concat", "flatten"}


def test_verify_detects_a_corrupted_weight_and_a_bad_memory_plan():
    cfg = _cfg("tiny-2x2")
    cn = compile_network(TINY, cfg, sparsity=0.0, seed=2, estimate=False)
    # one weight word of b3.0's stream flipped: that layer (and what reads it) mismatch
    cl = next(c for c in cn.layers if c.name == "b3.0")
    arr = cl.array
    ddr = arr.ddr.copy()
    last = ddr.size - 1                   # the last weight word of its stream
    if arr.jobs[0].prefetch:              # (prefetched: its stream's, ahead of the wrappers)
        _, pieces = arr.jobs[0].prefetch[max(arr.jobs[0].prefetch)]
        last = pieces[-1][1] + pieces[-1][2] - 1 - arr.ddr_base
    ddr[last] ^= np.uint64(0x55)
    cl.array = dataclasses.replace(arr, ddr=ddr)
    checks, _ = verify_network(cn, seed=2)
    assert not next(c for c in checks if c.name == "b3.0").ok
    assert next(c for c in checks if c.name == "stem.0").ok
    # a plan that puts the add's output on top of its second input, still needed: caught
    cn = compile_network(TINY, cfg, sparsity=0.0, seed=2, estimate=False)
    checks, _ = verify_network(cn, seed=2)
    assert all(c.ok for c in checks)
    g = cn.qnet.graph
    pool = g["add"].inputs[0]
    cn.plan.base["b1.0"] = cn.plan.base[pool]           # b1 overwrites the pooled input
    cn2 = compile_network(TINY, cfg, sparsity=0.0, seed=2, estimate=False, prefetch=False)
    cn2.plan = cn.plan
    idx = next(i for i, c in enumerate(cn2.layers) if c.name == "b1.0")
    from tilewright.sw.array_compiler import Placement, compile_conv_array
    from tilewright.sw.netcompile import _layer_of
    arr = cn2.layers[idx].array
    cn2.layers[idx].array = compile_conv_array(
        _layer_of(g, cn2.qnet, g["b1.0"], cfg.tile.block), np.zeros(arr.in_shape, np.int8),
        cfg, place=Placement((cn.plan.base[pool],), cn.plan.base[pool], arr.ddr_base))
    checks, _ = verify_network(cn2, seed=2)
    assert not all(c.ok for c in checks)


def test_unsupported_model_and_bad_spec_are_errors(capsys):
    with pytest.raises(CompileError, match="module:factory"):
        load_model("resnet5")
    with pytest.raises(CompileError, match="cannot import"):
        load_model("no_such_module_xyz:f")
    rc = main(["compile", "torch.nn:Sigmoid", "--overlay", "tiny-2x2", "--input-shape",
               "8,4,4"])
    assert rc == 1
    assert "error:" in capsys.readouterr().err


def test_cli_compile_json_and_outputs(tmp_path, capsys):
    out = tmp_path / "c"
    rc = main(["compile", TINY, "--overlay", "tiny-2x2", "--sparsity", "0.5", "--json",
               "-o", str(out)])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("cycles", "time_ms", "ddr_bytes", "ddr_bytes_lower_bound", "compile_s",
                "layers", "mac_utilization", "compute_cycles", "ddr_cycles", "sync_cycles"):
        assert key in r, key
    assert r["cycles"] == sum(la["cycles"] for la in r["layers"])
    assert r["ddr_bytes"] == sum(la["ddr_bytes"] for la in r["layers"])
    # the DDR estimate is a bound the overlay model's timing never beats (the busiest channel
    # cannot move its words faster)
    slow = [(la["name"], la["ddr_cycles"], la["cycles"]) for la in r["layers"]
            if la["ddr_cycles"] > la["cycles"]]
    assert not slow, slow
    man = json.loads((out / "manifest.json").read_text())
    cfg = _cfg("tiny-2x2")
    assert (out / "ddr.bin").stat().st_size == man["ddr_image"]["words"] * cfg.tile.word_bytes
    runs = [f for la in man["layers"] for f in la["runs"]]
    assert len(runs) == sum(la["runs"] for la in r["layers"])
    assert all((out / f).read_text().strip() for f in runs)


def test_cli_compile_table_and_verify(capsys):
    assert main(["compile", TINY_VGG, "--overlay", "tiny-2x2"]) == 0
    text = capsys.readouterr().out
    assert "classifier.0" in text and "cycles" in text
    assert main(["verify", TINY_VGG, "--overlay", "tiny-2x2", "--sparsity", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "MISMATCH" not in text


@pytest.mark.verilator
def test_tiny_network_on_rtl_layer_by_layer():
    """tiny_resnet on tiny-2x2, every layer's compiled runs (the configuration records that
    `compile -o` writes) on the Verilator overlay in one simulator process, chained through
    one DDR image and the memtiles (some layers' weights prefetched by the layer before):
    every layer's output equals the integer oracle, its DDR words the overlay model's, and
    the cycles are within 2 % of the estimate."""
    from tilewright.sim.overlay_sim import OverlayJob, run_overlay_jobs

    cfg = _cfg("tiny-2x2")
    cn = compile_network(TINY, cfg, sparsity=0.5, seed=3)
    assert any(cl.array is not None and cl.array.jobs[0].prefetch for cl in cn.layers)
    checks, env = verify_network(cn, seed=3)
    assert all(c.ok for c in checks)
    ddr = cn.image(env[cn.qnet.graph.input_name][0].numpy())
    layers = [cl for cl in cn.layers if cl.array is not None]
    jobs, owner = [], []
    for cl in layers:
        lo, n = cl.array.out_region
        for job in cl.array.jobs:
            jobs.append(OverlayJob(ddr, job.records(cfg), (lo, lo + n)))
            owner.append(cl.name)
    results = list(run_overlay_jobs(cfg, jobs))
    for cl in layers:
        mine = [r for r, o in zip(results, owner, strict=True) if o == cl.name]
        got = cl.array.read_output(mine[-1].ddr_out)
        want = env[cl.tensor][0].numpy().reshape(got.shape)
        assert np.array_equal(got, want), f"{cl.name}: RTL output differs (seed=3)"
        assert sum(r.rd_words + r.wr_words for r in mine) * cfg.tile.word_bytes \
            == cl.ddr_bytes, cl.name
    rtl = sum(r.cycles for r in results)
    est = sum(cl.cycles for cl in layers)
    assert abs(rtl - est) <= 0.02 * rtl, (rtl, est)


def test_compile_and_verify_a_trainer_checkpoint(tmp_path):
    """A QAT checkpoint of the trainer's fmnist-resnet (one 8x8 block pruned): compiled with
    its own scales and mask, verified layer by layer, and the pruned block is not stored."""
    from tilewright.sw.prune.checkpoint import FORMAT, save_checkpoint
    from tilewright.sw.prune.models import arch_record, fmnist_resnet
    from tilewright.sw.prune.qat import calibrate, prepare_qat, quant_params

    torch.manual_seed(4)
    kw = {"widths": [8, 16, 16], "blocks": [1, 1, 1]}
    model = fmnist_resnet(**kw).eval()
    g = torch.Generator().manual_seed(4)
    for m in model.modules():                # the residual blocks' last BN starts at zero
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.5)
    pruned = "stages.1.0.conv2"
    mask = torch.tensor([[True, False], [True, True]])
    with torch.no_grad():
        model.get_submodule(pruned).weight[0:8, 8:16] = 0
    gm = prepare_qat(model)
    calibrate(gm, [torch.randn(8, 1, 28, 28) for _ in range(2)])
    gm.eval()
    quant = quant_params(gm)
    quant["form"] = "qat"
    ck = {"format": FORMAT, "arch": arch_record("fmnist-resnet", kw),
          "state_dict": gm.state_dict(), "masks": {pruned: mask},
          "pattern": {"kind": "block", "block": [8, 8]}, "sparsity": {pruned: 0.25},
          "quant": quant}
    save_checkpoint(tmp_path / "c.pt", ck)
    cfg = _cfg("aie2-2x2")
    cn = compile_network("fmnist", cfg, checkpoint=tmp_path / "c.pt", seed=4)
    assert cn.sparsity is None and cn.model == "c"
    cl = next(c for c in cn.layers if c.name == pruned)
    assert (cl.blocks, cl.nnz_blocks) == (4, 3)
    checks, _ = verify_network(cn, seed=4)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_prefetch_moves_the_next_weights_into_the_run_before():
    """With prefetch, a conv whose predecessor has idle DDR channels replays its weights from
    the memtiles from its first run on: it reads fewer DDR words, the layer before reads
    them (wrapped for the memtile only) at the end of its last run, the memtile regions of
    the two do not overlap, and the network stays bit-exact on the model."""
    from tilewright.hw.overlay import array_memtile
    from tilewright.sim.dm_model import bd_addresses

    cfg = _cfg("tiny-2x2")
    on = compile_network(TINY, cfg, sparsity=0.5, seed=3)
    off = compile_network(TINY, cfg, sparsity=0.5, seed=3, prefetch=False)
    assert not any(cl.array is not None and cl.array.jobs[0].prefetch for cl in off.layers)
    arrays = [cl for cl in on.layers if cl.array is not None]
    pairs = [(a, b) for a, b in itertools.pairwise(arrays) if b.array.jobs[0].prefetch]
    assert pairs
    by_name = {cl.name: cl for cl in off.layers}
    for a, b in pairs:
        assert b.prefetched and b.row(cfg)["prefetched"]
        assert b.array.jobs[0].memtile_use and set(b.array.jobs[0].memtile_use.values()) \
            <= {"prefetched"}
        # (less what it reads for the layer after it, if that one is prefetched too)
        extra = sum(w.size for _, w in b.array.extra_reads) * cfg.tile.word_bytes
        assert b.ddr_bytes - extra < by_name[b.name].ddr_bytes, b.name
        assert a.ddr_bytes > by_name[a.name].ddr_bytes, a.name
        assert a.array.extra_reads
        # the memtile words the last run before reads (its replays) are not the ones it
        # writes the next layer's streams to
        mcfg = array_memtile(cfg)
        for (c, _), (base, pieces) in b.array.jobs[0].prefetch.items():
            region = set(range(base, base + sum(n for *_, n in pieces)))
            for ch, bds in a.array.jobs[-1].memtile_bds.get(c, {}).items():
                if ch >= mcfg.s2mm:
                    for bd in bds:
                        addrs, ok = bd_addresses(bd)
                        assert not region & set(addrs[ok].tolist()), (a.name, b.name, c)
    total_on = sum(cl.ddr_bytes for cl in on.layers)
    total_off = sum(cl.ddr_bytes for cl in off.layers)
    assert total_off <= total_on <= 1.01 * total_off
    checks, _ = verify_network(on, seed=3)
    assert all(c.ok for c in checks), [c.name for c in checks if not c.ok]


def test_cli_no_prefetch(capsys):
    """`--no-prefetch` compiles every conv to read its own weights; by default some layers of
    tiny_resnet on tiny-2x2 are prefetched and marked in the JSON and the table."""
    assert main(["compile", TINY, "--overlay", "tiny-2x2", "--sparsity", "0.5", "--json"]) == 0
    on = json.loads(capsys.readouterr().out)
    assert main(["compile", TINY, "--overlay", "tiny-2x2", "--sparsity", "0.5", "--json",
                 "--no-prefetch"]) == 0
    off = json.loads(capsys.readouterr().out)
    assert any(r["prefetched"] for r in on["layers"])
    assert not any(r["prefetched"] for r in off["layers"])
    assert main(["compile", TINY, "--overlay", "tiny-2x2", "--sparsity", "0.5"]) == 0
    assert "whose weights the layer before prefetched" in capsys.readouterr().out


def test_model_stops_on_a_packet_its_bds_do_not_complete():
    """A prefetch wrapper whose header claims one word more than its BDs read: the model
    names the channel and the packet (the RTL would wait for the word) instead of taking
    the short packet."""
    cfg = _cfg("tiny-2x2")
    cn = compile_network(TINY, cfg, sparsity=0.5, seed=3, estimate=False)
    layers = [cl for cl in cn.layers if cl.array is not None]
    i = next(i for i, cl in enumerate(layers) if cl.prefetched)
    (c, bus), (_, pieces) = min(layers[i].array.jobs[0].prefetch.items())
    hdr = pieces[0][0]
    donor = layers[i - 1]
    extra = dict(donor.array.extra_reads)
    extra[hdr] = extra[hdr] + np.uint64(1)
    donor.array.extra_reads = tuple(extra.items())
    with pytest.raises(DeadlockError, match=rf"shim read channel of column {c} \(bus {bus}\)"
                                            r".*header says \d+ words, its BDs bring"):
        estimate_layer(donor, cfg)


def test_verify_reports_a_layer_the_model_stops_on():
    """A layer whose prefetch for the next layer finds no memtile BD to land in: that layer
    fails with the model's deadlock named, the later layers are not run, and the CLI's
    verdict would say so (FAIL, not a traceback)."""
    cfg = _cfg("tiny-2x2")
    cn = compile_network(TINY, cfg, sparsity=0.5, seed=3, estimate=False)
    arrays = [cl for cl in cn.layers if cl.array is not None]
    i = next(i for i, cl in enumerate(arrays) if cl.prefetched)
    c, bus = min(arrays[i].array.jobs[0].prefetch)
    del arrays[i - 1].array.jobs[-1].memtile_bds[c][bus]
    checks, _ = verify_network(cn, seed=3)
    assert not checks[-1].ok and "DeadlockError" in checks[-1].error, checks[-1]
    assert checks[-1].name == arrays[i - 1].name
    assert all(c.ok for c in checks[:-1])
    assert len(checks) < len([c for c in cn.layers if c.kind != "flatten"
                              and not (c.kind == "add" and c.fused)])
