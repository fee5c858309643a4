"""SVDQuant's numbers: the 4-bit formats, the smoothing search, and the emulated layer."""

from __future__ import annotations

import pytest
import torch

from qconvert.codecs.svdquant import algorithm as A
from qconvert.codecs.svdquant import quant as Q


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def outlier_layer(n=384, k=256, rows=320, seed=0):
    """A layer whose inputs have a few hot channels, as transformer activations do."""
    g = gen(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    b = torch.randn(n, generator=g) * 0.01
    x = torch.randn(rows, k, generator=g)
    x[:, :4] *= 40
    return w, b, x


def test_int4_weights():
    w = torch.randn(8, 128, generator=gen())
    codes, scales = Q.int4_weight(w)
    assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert scales.dtype == torch.bfloat16 and scales.shape == (8, 2)
    assert torch.equal(scales, (w.reshape(8, 2, 64).abs().amax(-1) / 7).to(torch.bfloat16))
    err = (Q.int4_dequantize(codes, scales) - w).abs()
    assert bool((err <= scales.float().repeat_interleave(64, 1) / 2 + 1e-6).all())  # round to nearest


def test_e2m1_rounding_ties_to_the_lower_index():
    x = torch.tensor([0.0, -0.0, 0.25, -0.25, 0.3, 0.75, 1.75, 2.5, 5.0, 5.1, 7.0, -7.0, -1.25, -0.1])
    assert Q.e2m1_codes(x).tolist() == [0, 0, 0, 0, 1, 1, 3, 4, 6, 7, 7, 15, 10, 0]
    assert Q.e2m1_values(torch.arange(16)).tolist() == list(Q.E2M1)


def test_nvfp4_weights_alpha_and_parts():
    w = torch.randn(256, 64, generator=gen())
    w[128:] *= 10  # a second part with another range: its own α
    q = Q.fp4_weight(w, (128, 128))
    for part in (slice(0, 128), slice(128, 256)):
        want = (w[part].reshape(128, 4, 16).abs().amax(-1) / 6).max() / 448
        assert q.alpha[part].float().unique().tolist() == [want.to(torch.bfloat16).item()]
    assert q.scales.dtype == torch.float8_e4m3fn and q.codes.dtype == torch.uint8


def test_activations_per_token_groups():
    x = torch.randn(3, 128, generator=gen()) * 5
    for unsigned in (False, True):
        xin = x.abs() if unsigned else x
        q = Q.int4_activations(xin, unsigned=unsigned)
        top = 15 if unsigned else 7
        step = (xin.reshape(3, 2, 64).abs().amax(-1) / top).to(torch.bfloat16).float()
        assert bool(((q - xin).abs().reshape(3, 2, 64) <= step[..., None] / 2 + 1e-5).all())
    f = Q.fp4_activations(x)
    assert f.shape == x.shape and float((f - x).pow(2).mean() / x.pow(2).mean()) < 0.02


def test_awq_is_close_and_in_range():
    w = torch.randn(64, 128, generator=gen()) + 0.3
    codes, scales, zeros = Q.awq_weight(w)
    assert int(codes.max()) <= 15 and codes.dtype == torch.uint8
    recon = Q.awq_dequantize(codes, scales, zeros)
    assert float((recon - w).abs().max()) <= float(scales.float().max()) * 0.51 + 0.02


def test_candidates_are_deepcompressors():
    grid = A.candidates(20)
    assert len(grid) == 39 and grid[0] == (0.0, 0.0) and (0.5, 0.5) in grid and (0.05, 0.0) in grid


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_svdquant_beats_plain_rounding_and_rank_helps(precision):
    w, b, x = outlier_layer()
    calib, held = x[:64], x[64:]
    ref = held @ w.T + b
    errors = {}
    for rank in (16, 64):
        choice = A.search(w, b, calib, x.abs().amax(0), precision=precision, rank=rank, grid=10)
        errors[rank] = A.output_error(choice.layer(held), ref)
        plain = A.output_error(A.build(w, b, torch.ones(256, dtype=torch.bfloat16), precision=precision,
                                       rank=0)(held), ref)
        assert errors[rank] < plain / 5  # well below plain 4-bit rounding of the same layer
    assert errors[64] < errors[16]


def test_the_mlp_down_shift_is_folded_into_the_bias():
    """With unquantized activations the shifted layer computes the same as the unshifted one."""
    w, b, _ = outlier_layer()
    x = torch.nn.functional.gelu(torch.randn(64, 256, generator=gen(3)) * 2, approximate="tanh")
    s = A.smooth_scale(x.abs().amax(0), w.abs().amax(0), 0.5, 0.5)
    plain = A.build(w, b, s, precision="int4", rank=16)
    shifted = A.build(w, b, s, precision="int4", rank=16, shift=A.GELU_SHIFT)
    exact = lambda layer: ((x + layer.shift) / layer.smooth.float()) @ layer.residual().T \
        + (x @ layer.down.float().T) @ layer.up.float().T + layer.bias.float()  # noqa: E731
    assert torch.allclose(exact(plain), exact(shifted), atol=2e-3)
    ref = x @ w.T + b
    assert A.output_error(shifted(x), ref) < A.output_error(plain(x), ref)  # unsigned codes are finer


def test_deterministic():
    w, b, x = outlier_layer()
    one = A.search(w, b, x[:32], x.abs().amax(0), precision="int4", rank=16, grid=4).layer
    two = A.search(w, b, x[:32], x.abs().amax(0), precision="int4", rank=16, grid=4).layer
    for k, v in vars(one).items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, getattr(two, k)), k
