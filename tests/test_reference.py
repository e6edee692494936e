"""The PyTorch integer reference and the quantiser.

The reference must equal the numpy numerics contract bit for bit, and a quantised layer run
through it must stay within one output LSB of the same layer in float.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilewright.sw import numerics
from tilewright.sw.quantize import (
    act_scale,
    apply_block_mask,
    block_mask,
    dequantize_act,
    fixed_point,
    quantize_act,
    quantize_add,
    quantize_avgpool,
    quantize_conv,
    quantize_maxpool,
    random_block_mask,
)
from tilewright.sw.reference import (
    add_int,
    avgpool_int,
    conv2d_int,
    linear_int,
    maxpool_int,
    requantize_t,
)

SEEDS = [0, 1, 2]


def _rand_i8(rng: np.random.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(rng.integers(-128, 128, shape, dtype=np.int8))


# requantize_t == numerics.requantize ------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("relu", [False, True])
def test_requantize_matches_numerics(seed: int, relu: bool) -> None:
    rng = np.random.default_rng(seed)
    c, n = 16, 257
    for shift in [0, 1, 2, 15, 31, 40, 62]:
        # accumulators beyond int32 (wrap), biases and multipliers over the full int32 range
        acc = rng.integers(-(1 << 40), 1 << 40, (n, c), dtype=np.int64)
        acc[:, :4] = rng.integers(-300, 300, (n, 4))
        bias = rng.integers(-(1 << 31), 1 << 31, c, dtype=np.int64)
        bias[:4] = 0
        mult = rng.integers(-(1 << 31), 1 << 31, c, dtype=np.int64)
        mult[:2] = [1, (1 << 31) - 1]
        mult[2:4] = [-(1 << 31), 3]
        want = numerics.requantize(acc, bias, mult, shift, relu)              # channels last
        got = requantize_t(torch.from_numpy(acc.T.copy()), torch.from_numpy(bias),
                           torch.from_numpy(mult), shift, relu).numpy().T
        assert got.dtype == np.int8
        bad = np.argwhere(got != want)
        assert bad.size == 0, (f"seed {seed} shift {shift} relu {relu}: first mismatch at "
                               f"{bad[0]}: {got[tuple(bad[0])]} != {want[tuple(bad[0])]}")


@pytest.mark.parametrize(("acc", "shift", "relu", "want"), [
    (3, 1, False, 2),          # 1.5 -> 2
    (-3, 1, False, -2),        # -1.5 -> -2 (half away from zero)
    (-5, 2, False, -1),        # -1.25 -> -1
    (-6, 2, False, -2),        # -1.5 -> -2
    (-2, 2, False, -1),        # -0.5 -> -1
    (2, 2, False, 1),          # 0.5 -> 1
    (1, 2, False, 0),          # 0.25 -> 0
    (-100, 0, False, -100),
    (-100, 0, True, 0),
    (1000, 0, False, 127),
    (-1000, 0, False, -128),
    ((1 << 31), 0, False, -128),        # wraps to -2**31
    ((1 << 32) + 5, 0, False, 5),       # wraps to 5
    (-(1 << 31) - 1, 0, False, 127),    # wraps to 2**31 - 1
])
def test_requantize_edge_cases(acc: int, shift: int, relu: bool, want: int) -> None:
    a = torch.tensor([[acc]], dtype=torch.int64)
    got = int(requantize_t(a, 0, 1, shift, relu)[0, 0])
    ref = int(numerics.requantize(np.array([[acc]]), np.array([0]), np.array([1]), shift,
                                  relu)[0, 0])
    assert got == want == ref, f"acc {acc} shift {shift} relu {relu}: {got}, numpy {ref}"


def test_requantize_large_product() -> None:
    # |v * M| = 2**62 at shift 62 is the extreme the contract allows
    a = torch.tensor([[-(1 << 31)], [-(1 << 31)]], dtype=torch.int64)
    m = torch.tensor([-(1 << 31), (1 << 31) - 1])
    got = requantize_t(a, 0, m, 62, False).flatten().tolist()
    want = numerics.requantize(a.numpy().T, np.zeros(2), m.numpy(), 62, False).flatten()
    assert got == want.tolist() == [1, -1]


def test_requantize_rejects_bad_arguments() -> None:
    acc = torch.zeros((2, 3), dtype=torch.int64)
    with pytest.raises(ValueError, match=r"shift must be 0\.\.62, not 63"):
        requantize_t(acc, 0, 1, 63, False)
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        requantize_t(acc, np.zeros(3, dtype=np.int64), 1, 0, False)
    with pytest.raises(TypeError, match="acc must hold integers"):
        requantize_t(acc.double(), 0, 1, 0, False)
    with pytest.raises(ValueError, match="mult values must be in"):
        requantize_t(acc, 0, np.array([1 << 31, 0]), 0, False)


# Convolution and linear -------------------------------------------------------------------

def _float_reference(conv: nn.Conv2d | nn.Linear, q, x_q: torch.Tensor) -> np.ndarray:
    """The quantised layer evaluated in float64, rounded to the output grid."""
    w = torch.from_numpy(q.weight.astype(np.float64) * q.s_w[:, None, None, None])
    bias = torch.from_numpy(q.bias.astype(np.float64) * q.s_in * q.s_w)
    x = dequantize_act(x_q, q.s_in)
    if q.is_linear:
        y = w[:, :, 0, 0] @ x + bias
    else:
        y = F.conv2d(x[None], w, bias, stride=q.stride, padding=q.padding)[0]
    r = y.numpy() / q.s_out
    r = np.sign(r) * np.floor(np.abs(r) + 0.5)
    return np.clip(r, 0 if q.relu else -128, 127)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("cin", "cout", "k", "stride", "pad", "relu"), [
    (3, 16, 7, 2, 3, True),            # ResNet50 stem
    (16, 24, 1, 1, 0, False),          # bottleneck 1x1
    (8, 16, 3, 2, 1, True),            # 3x3 / 2
    (12, 8, (1, 7), 1, (0, 3), True),  # Inception 1x7
    (12, 8, (7, 1), 1, (3, 0), False),  # Inception 7x1
])
def test_conv_matches_float(seed: int, cin: int, cout: int, k, stride: int, pad,
                            relu: bool) -> None:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, pad).double()
    x = torch.from_numpy(rng.standard_normal((cin, 13, 11)))
    y = conv(x[None])[0].detach()
    s_in, s_out = act_scale(x), act_scale(torch.relu(y) if relu else y)
    q = quantize_conv(conv, s_in, s_out, relu)
    x_q = quantize_act(x, s_in)
    got = conv2d_int(x_q, torch.from_numpy(q.weight), q.bias, q.mult, q.shift, q.stride,
                     q.padding, q.relu).numpy().astype(np.int64)
    want = _float_reference(conv, q, x_q)
    diff = np.abs(got - want)
    assert diff.max() <= 1, (f"seed {seed}: int reference differs from float by "
                             f"{diff.max()} LSB at {np.argwhere(diff > 1)[0]}")
    # and the whole pipeline stays close to the unquantised float layer
    err = np.abs(got * s_out - (torch.relu(y) if relu else y).numpy())
    assert err.mean() < 0.6 * s_out and err.max() < 3 * s_out, (
        f"seed {seed}: error mean {err.mean() / s_out:.2f} max {err.max() / s_out:.2f} LSB")


@pytest.mark.parametrize("seed", SEEDS)
def test_linear_matches_float_and_conv(seed: int) -> None:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    fc = nn.Linear(64, 20).double()
    x = torch.from_numpy(rng.standard_normal(64))
    y = fc(x).detach()
    q = quantize_conv(fc, act_scale(x), act_scale(y), relu=False)
    assert q.is_linear and q.weight.shape == (20, 64, 1, 1)
    x_q = quantize_act(x, q.s_in)
    got = linear_int(x_q, torch.from_numpy(q.weight[:, :, 0, 0]), q.bias, q.mult, q.shift)
    want = _float_reference(fc, q, x_q)
    assert np.abs(got.numpy() - want).max() <= 1, f"seed {seed}"
    as_conv = conv2d_int(x_q[:, None, None], torch.from_numpy(q.weight), q.bias, q.mult,
                         q.shift)
    assert torch.equal(as_conv[:, 0, 0], got), f"seed {seed}: linear != 1x1 conv"


def test_conv_exact_against_integer_loops() -> None:
    seed = 7
    rng = np.random.default_rng(seed)
    x = _rand_i8(rng, (5, 6, 7))
    w = _rand_i8(rng, (3, 5, 3, 2))
    bias = torch.from_numpy(rng.integers(-5000, 5000, 3))
    mult = torch.from_numpy(rng.integers(1 << 20, 1 << 22, 3))
    got = conv2d_int(x, w, bias, mult, 26, 2, (1, 0), False)
    xp = np.pad(x.numpy().astype(np.int64), ((0, 0), (1, 1), (0, 0)))
    ho, wo = (6 + 2 - 3) // 2 + 1, (7 - 2) // 2 + 1
    acc = np.zeros((3, ho, wo), dtype=np.int64)
    for oy in range(ho):
        for ox in range(wo):
            patch = xp[:, 2 * oy:2 * oy + 3, 2 * ox:2 * ox + 2]
            acc[:, oy, ox] = np.einsum("chw,ochw->o", patch, w.numpy().astype(np.int64))
    want = numerics.requantize(acc.transpose(1, 2, 0), bias.numpy(), mult.numpy(), 26,
                               False).transpose(2, 0, 1)
    assert np.array_equal(got.numpy(), want), f"seed {seed}"


def test_conv_rejects_bad_inputs() -> None:
    x = torch.zeros((3, 4, 4), dtype=torch.int8)
    with pytest.raises(TypeError, match="x must be an int8 tensor"):
        conv2d_int(x.float(), torch.zeros((1, 3, 1, 1), dtype=torch.int8), 0, 1, 0)
    with pytest.raises(ValueError, match="w has 2 input channels but x has 3"):
        conv2d_int(x, torch.zeros((1, 2, 1, 1), dtype=torch.int8), 0, 1, 0)
    with pytest.raises(ValueError, match="kernel 7 does not fit"):
        conv2d_int(x, torch.zeros((1, 3, 7, 7), dtype=torch.int8), 0, 1, 0)


# Pools and addition -----------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_maxpool_semantics(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = _rand_i8(rng, (6, 9, 8))
    x[0] = -100                                   # all negative: padding must not win
    x[1, :, :] = -128
    got = maxpool_int(x, 3, 2, 1)
    want = F.max_pool2d(x.double()[None], 3, 2, 1)[0].to(torch.int8)
    assert got.shape == (6, 5, 4)
    assert torch.equal(got, want), f"seed {seed}"
    assert (got[0] == -100).all() and (got[1] == -128).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_avgpool_semantics(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = _rand_i8(rng, (5, 6, 7))
    mult = torch.from_numpy(rng.integers(1 << 10, 1 << 12, 5))
    got = avgpool_int(x, 3, 1, 1, mult, 13)
    sums = F.avg_pool2d(x.double()[None], 3, 1, 1, count_include_pad=True)[0] * 9
    want = requantize_t(sums.round().to(torch.int64), 0, mult, 13, False)
    assert torch.equal(got, want), f"seed {seed}"
    # quantised average within 1 LSB of the float average (count_include_pad semantics)
    s_in, s_out = 0.05, 0.03
    qp = quantize_avgpool(3, s_in, s_out)
    got = avgpool_int(x, 3, 1, 1, qp.mult, qp.shift).numpy()
    fl = F.avg_pool2d(x.double()[None] * s_in, 3, 1, 1, count_include_pad=True)[0].numpy()
    r = fl / s_out
    r = np.clip(np.sign(r) * np.floor(np.abs(r) + 0.5), -128, 127)
    assert np.abs(got - r).max() <= 1, f"seed {seed}"


@pytest.mark.parametrize("seed", SEEDS)
def test_global_avgpool(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = _rand_i8(rng, (16, 7, 7))
    qp = quantize_avgpool((7, 7), 0.1, 0.02)
    got = avgpool_int(x, (7, 7), 1, 0, qp.mult, qp.shift)
    assert got.shape == (16, 1, 1)
    r = x.double().mean(dim=(1, 2)).numpy() * 0.1 / 0.02
    r = np.clip(np.sign(r) * np.floor(np.abs(r) + 0.5), -128, 127)
    assert np.abs(got.numpy()[:, 0, 0] - r).max() <= 1, f"seed {seed}"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("relu", [False, True])
def test_add_semantics(seed: int, relu: bool) -> None:
    rng = np.random.default_rng(seed)
    a, b = _rand_i8(rng, (8, 5, 6)), _rand_i8(rng, (8, 5, 6))
    s_a, s_b, s_out = 0.04, 0.013, 0.05
    qa = quantize_add(s_a, s_b, s_out, relu)
    assert qa.mul_a == 1 << 14 and 0 < qa.mul_b < 1 << 14
    got = add_int(a, b, qa.mul_a, qa.mul_b, 0, qa.mult, qa.shift, relu).numpy()
    r = (a.double().numpy() * s_a + b.double().numpy() * s_b) / s_out
    r = np.clip(np.sign(r) * np.floor(np.abs(r) + 0.5), 0 if relu else -128, 127)
    assert np.abs(got - r).max() <= 1, f"seed {seed}"
    # exact integer semantics with per-channel bias and multiplier
    bias = torch.from_numpy(rng.integers(-1000, 1000, 8))
    mult = torch.from_numpy(rng.integers(1, 1 << 16, 8))
    got = add_int(a, b, -3, 7, bias, mult, 12, relu)
    acc = -3 * a.to(torch.int64) + 7 * b.to(torch.int64)
    assert torch.equal(got, requantize_t(acc, bias, mult, 12, relu)), f"seed {seed}"
    with pytest.raises(ValueError, match="mul_a must be an int16"):
        add_int(a, b, 1 << 15, 1, 0, 1, 0)


# Quantiser --------------------------------------------------------------------------------

def test_fixed_point_shift_choice() -> None:
    mult, shift = fixed_point(np.array([0.5, 0.25, 0.0]))
    assert shift == 31 and mult.tolist() == [1 << 30, 1 << 29, 0]
    mult, shift = fixed_point(np.array([1.0]))
    # round(1.0 * 2**31) == 2**31 does not fit: one bit less
    assert shift == 30 and mult.tolist() == [1 << 30]
    mult, shift = fixed_point(np.array([1e-12]))
    assert shift == 62 and int(mult[0]) == round(1e-12 * 2.0**62)
    with pytest.raises(ValueError, match="does not fit an int32 even at shift 0"):
        fixed_point(np.array([3e9]))
    with pytest.raises(ValueError, match="finite and non-negative"):
        fixed_point(np.array([-1.0]))


def test_act_scale_and_maxpool_quant() -> None:
    assert act_scale(torch.tensor([-2.54, 1.0])) == pytest.approx(2.54 / 127)
    assert act_scale(np.zeros(4)) > 0
    assert quantize_act(torch.tensor([0.5, -0.5, 1.5, 300.0]), 1.0).tolist() == [1, -1, 2, 127]
    mp = quantize_maxpool(3)
    assert (mp.kernel, mp.mult, mp.shift) == ((3, 3), 1, 0)


def test_quantize_conv_zero_channels_and_mask() -> None:
    seed = 3
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    mask = random_block_mask(2, 2, 0.5, rng)
    q = quantize_conv(conv, 0.02, 0.05, relu=True, mask=mask, block=8)
    assert np.array_equal(block_mask(q.weight, 8), mask), f"seed {seed}"
    assert q.weight.dtype == np.int8 and q.bias.dtype == np.int32 and q.mult.dtype == np.int32
    assert np.abs(q.weight).max() == 127
    with torch.no_grad():
        conv.weight.zero_()
    q = quantize_conv(conv, 0.02, 0.05, relu=False)
    assert not q.weight.any() and q.mult.max() < 1 << 31
    with pytest.raises(ValueError, match="groups must be 1"):
        quantize_conv(nn.Conv2d(4, 4, 3, groups=2), 0.1, 0.1, False)
    with pytest.raises(TypeError, match=r"torch\.nn\.Conv2d or torch\.nn\.Linear"):
        quantize_conv(nn.ReLU(), 0.1, 0.1, False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="s_out must be a positive finite float"):
        quantize_conv(conv, 0.1, 0.0, False)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_block_masks(seed: int, sparsity: float) -> None:
    rng = np.random.default_rng(seed)
    mask = random_block_mask(5, 7, sparsity, rng)
    assert mask.shape == (5, 7)
    assert (~mask).sum() == int(np.floor(sparsity * 35 + 0.5)), f"seed {seed}"
    w = rng.integers(-128, 128, (37, 50, 3, 3), dtype=np.int8)
    w[w == 0] = 1
    wm = apply_block_mask(w, mask, 8)
    assert np.array_equal(block_mask(wm, 8), mask), f"seed {seed}"
    keep = np.kron(mask, np.ones((8, 8), dtype=bool))[:37, :50]
    assert np.array_equal(wm != 0, np.broadcast_to(keep[:, :, None, None], w.shape))
    with pytest.raises(ValueError, match=r"mask shape \(5, 7\) does not match"):
        apply_block_mask(w, mask, 4)
    with pytest.raises(ValueError, match=r"sparsity must be in 0\.\.1, not 1\.5"):
        random_block_mask(2, 2, 1.5, rng)
