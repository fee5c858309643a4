"""The GGUF encoders across devices and source dtypes.

On CUDA the torch encoders run; their bytes are compared here with ggml's and
with the CPU's.  Those tests skip without a GPU (CI has none);
``benchmarks/device_check.sh`` runs them on one (``-k cuda``).  What makes the
torch code exact anywhere is tested on every machine: the check that picks a
single-call sum only where it adds in ggml's order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from qconvert.errors import QuantizationError
from qconvert.formats.gguf import _fit
from qconvert.formats.gguf.quants import K_QUANTS, SUPPORTED_TYPES, quantize, type_size
from tests.formats.test_gguf_quants import ORACLE, block_errors, edge_rows, importance, oracle_test, trained_weights

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    rng = np.random.default_rng(4242)
    return np.concatenate([trained_weights(rng, 256), edge_rows(rng)])


# ------------------------------------------------------------------ CUDA

@needs_cuda
@oracle_test
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES, key=int), ids=lambda t: t.name)
def test_cuda_identical_to_ggml(qtype: QT, with_imatrix: bool, data: np.ndarray):
    """The spec allows a K type 0.1% differing super-blocks on a GPU (a
    compiler may fuse a multiply-add), none with a larger error than ggml's;
    everything else must be exact."""
    qw = importance(np.random.default_rng(9)) if with_imatrix else None
    ours = quantize(data, qtype, qw, device="cuda", name="test")
    ggml = ORACLE.quantize(data, qtype, qw)
    ts = type_size(qtype)
    same = (ours.reshape(-1, ts) == ggml.reshape(-1, ts)).all(1)
    print(f"\ncuda {qtype.name:5} {'imatrix' if qw is not None else 'ref':7} {same.mean():9.4%} of {same.size} "
          "blocks identical to ggml")
    if qtype not in K_QUANTS:
        assert same.all(), f"{qtype.name} on cuda: {(~same).sum()} of {same.size} blocks differ from ggml"
        return
    assert same.mean() >= 0.999, f"{qtype.name} on cuda: {(~same).sum()} of {same.size} super-blocks differ"
    worse = block_errors(data, ours, qtype, qw) > block_errors(data, ggml, qtype, qw)
    assert not (worse & ~same).any(), "a differing block has a larger error than ggml's"


@needs_cuda
@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q3_K, QT.Q5_0], ids=lambda t: t.name)
def test_cuda_chunks_starting_inside_a_row(qtype: QT, monkeypatch):
    """Small GPU chunks that start inside a row still find each block's
    imatrix entries: the bytes equal the CPU's."""
    from qconvert.formats.gguf import quants

    rng = np.random.default_rng(768)
    x, qw = trained_weights(rng, 300, 768), importance(rng, 768)
    monkeypatch.setattr(quants, "_GPU_CHUNK", 5 * 256 * 7)
    assert np.array_equal(quantize(x, qtype, qw, device="cuda"), quantize(x, qtype, qw, device="cpu"))


# ------------------------------------------------------------------ sums in ggml's order

@pytest.mark.parametrize("device", DEVICES)
def test_seq_sum_adds_in_ggml_order(device: str):
    gen = torch.Generator().manual_seed(1)
    terms = torch.randn(32, 4, 513, generator=gen) * torch.exp2(torch.randint(-40, 40, (32, 4, 513), generator=gen))
    terms = terms.to(device)
    expected = torch.zeros_like(terms[0])
    for t in terms:
        expected += t
    assert torch.equal(_fit.seq_sum(terms).view(torch.int32), expected.view(torch.int32))


def test_the_order_check_tells_other_orders_apart():
    """Whatever torch does, a single-call sum is used only where it passes:
    the check must reject a pairwise sum, another order, a wider accumulator,
    and one that loses the sign of zero."""
    cpu = torch.device("cpu")
    assert _fit.sums_like_loop(_fit._loop_sum, cpu)
    assert not _fit.sums_like_loop(lambda t: t.sum(0), cpu)
    assert not _fit.sums_like_loop(lambda t: _fit._loop_sum(t.flip(0)), cpu)
    assert not _fit.sums_like_loop(lambda t: t.double().sum(0).float(), cpu)
    assert not _fit.sums_like_loop(lambda t: _fit._loop_sum(t).abs(), cpu)
    assert _fit._ordered_sum("cpu") in ("index_add", "loop")


# ------------------------------------------------------------------ source dtypes

@pytest.mark.parametrize(("qtype", "dtype"), [(QT.BF16, torch.bfloat16), (QT.F16, torch.float16),
                                              (QT.F32, torch.float32)], ids=["BF16", "F16", "F32"])
def test_a_tensor_already_in_the_target_type_is_copied_bit_for_bit(qtype: QT, dtype: torch.dtype):
    x = torch.from_numpy(trained_weights(np.random.default_rng(5), 8, 512)).to(dtype)
    x[0, :4] = torch.tensor([-0.0, 0.0, 1e-7, -3.0])
    out = quantize(x, qtype)
    assert out.shape == (8, 512 * x.element_size())
    assert np.array_equal(out, x.view(torch.uint8).numpy())
    assert np.array_equal(out, quantize(x.float(), qtype)), "the float32 route writes the same bytes"


@pytest.mark.parametrize("qtype", [QT.BF16, QT.F16, QT.Q8_0], ids=lambda t: t.name)
def test_nonfinite_values_are_counted_in_the_error(qtype: QT):
    x = torch.zeros(4, 256, dtype=torch.bfloat16 if qtype != QT.F16 else torch.float16)
    x[1, 7], x[3, 0] = float("nan"), float("-inf")
    with pytest.raises(QuantizationError, match=r"tensor blk\.1\.w: contains NaN/Inf \(2 value\(s\)\)"):
        quantize(x, qtype, name="blk.1.w")
