"""The GGUF encoders across devices and source dtypes.

On CUDA the torch encoders run (test_gguf_quants compares their bytes with
ggml's; here, with the CPU's where chunks start inside rows).  Those tests
skip without a GPU (CI has none); ``benchmarks/device_check.sh`` runs them on
one (``-k cuda``).  What makes the torch code exact anywhere is tested on
every machine: the check that picks a single-call sum only where it adds in
ggml's order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from qconvert.codecs.gguf import _fit
from qconvert.codecs.gguf.quants import K_QUANTS, LEGACY_QUANTS, quantize
from qconvert.core.errors import QuantizationError
from tests.formats.test_gguf_quants import edge_rows, importance, needs_cuda, needs_numba, trained_weights

DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


# ------------------------------------------------------------------ CUDA
# (test_gguf_quants runs its oracle tests on CUDA too)

@needs_cuda
@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q3_K, QT.Q5_0], ids=lambda t: t.name)
def test_cuda_chunks_starting_inside_a_row(qtype: QT, monkeypatch):
    """Small GPU chunks that start inside a row still find each block's
    imatrix entries: the bytes equal the CPU's."""
    from qconvert.codecs.gguf import quants

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


@needs_numba
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
def test_torch_encoders_are_exact_with_the_plain_loop_sum(with_imatrix: bool, monkeypatch):
    """Where no single-call sum passes the order check (a GPU whose torch sums
    otherwise), the torch encoders fall back to a loop of adds: every type
    still writes the numba (ggml-identical) bytes with it."""
    monkeypatch.setattr(_fit, "_ordered_sum", lambda device_type: "loop")
    rng = np.random.default_rng(11)
    x = np.concatenate([trained_weights(rng, 24, 512), edge_rows(rng, 512)])
    qw = importance(rng, 512) if with_imatrix else None
    for qtype in sorted(LEGACY_QUANTS | K_QUANTS, key=int):
        assert np.array_equal(quantize(x, qtype, qw, backend="torch"), quantize(x, qtype, qw, backend="numba")), qtype.name


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
    with pytest.raises(QuantizationError, match=r"tensor blk\.1\.w: 2 NaN/Inf value\(s\) in the weights"):
        quantize(x, qtype, name="blk.1.w")



# ------------------------------------------------------------------ first use

def test_a_slow_first_use_is_announced_once(monkeypatch):
    """numba compiling a kernel (up to a minute on a new machine) is announced
    instead of a silent stall; a later use, or a quick one, says nothing."""
    import time

    from qconvert.codecs.gguf import quants

    monkeypatch.setattr(quants, "_SLOW_START_S", 0.01)
    monkeypatch.setattr(quants, "_USED_KERNELS", set())
    said: list[str] = []
    with quants._first_use_notice("k", said.append, "compiling"):
        time.sleep(0.5)
    with quants._first_use_notice("k", said.append, "compiling"):
        time.sleep(0.5)
    monkeypatch.setattr(quants, "_SLOW_START_S", 60.0)
    with quants._first_use_notice("quick", said.append, "compiling"):
        pass
    assert said == ["compiling"]
