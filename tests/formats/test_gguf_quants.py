"""qconvert's GGUF encoders against ggml itself and against gguf-py.

The oracle tests call ``ggml_quantize_chunk`` from the libggml that
llama-cpp-python ships (``tests/ggml_oracle.py``) and compare every block.
Run with ``-s`` to see the identity rate of each type.  The quantized types
have two backends, torch and numba (``quantize(..., backend=)``); both are
tested against ggml and against each other.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from qconvert.codecs.gguf import quants as quants_module
from qconvert.codecs.gguf.quants import (
    FLOAT_TYPES,
    IQ_QUANTS,
    K_QUANTS,
    LEGACY_QUANTS,
    SUPPORTED_TYPES,
    block_size,
    bytes_per_row,
    dequantize,
    quantize,
    type_size,
)
from qconvert.core.errors import QuantizationError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ggml_oracle  # noqa: E402

ORACLE, ORACLE_MISSING = ggml_oracle.load()
needs_oracle = [pytest.mark.oracle,
                pytest.mark.skipif(ORACLE is None, reason=f"ggml oracle unavailable: {ORACLE_MISSING}")]


def oracle_test(fn):
    for mark in needs_oracle:
        fn = mark(fn)
    return fn


HAS_NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
BACKENDS = ["torch", pytest.param("numba", marks=needs_numba)]


def with_backends(types) -> list:
    """``(qtype, backend)`` cases: every type in torch, the quantized ones
    (all but F32/F16/BF16) in numba too."""
    cases = []
    for qtype in sorted(types, key=int):
        cases.append(pytest.param(qtype, "torch", id=f"{qtype.name}-torch"))
        if qtype not in FLOAT_TYPES:
            cases.append(pytest.param(qtype, "numba", id=f"{qtype.name}-numba", marks=needs_numba))
    return cases


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def with_devices(types) -> list:
    """``(qtype, backend, device)`` cases: :func:`with_backends` on the CPU,
    and the quantized types in torch on CUDA (skipped without a GPU)."""
    cases = [pytest.param(*case.values, "cpu", id=case.id, marks=case.marks) for case in with_backends(types)]
    cases += [pytest.param(qtype, "torch", "cuda", id=f"{qtype.name}-torch-cuda", marks=needs_cuda)
              for qtype in sorted(types, key=int) if qtype not in FLOAT_TYPES]
    return cases


EXACT_TYPES = sorted(FLOAT_TYPES - {QT.F32} | LEGACY_QUANTS, key=int)
FITTED = K_QUANTS | IQ_QUANTS  # scales fitted by search: a near-tie may flip off the CPU
ALL_QUANTS = sorted(LEGACY_QUANTS | FITTED, key=int)
N = 1024  # row length: 4 super-blocks, 32 legacy blocks


def bf16_values(x: np.ndarray) -> np.ndarray:
    """The float32 values of ``x`` rounded to bfloat16, as checkpoints hold them."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).bfloat16().float().numpy()


def trained_weights(rng: np.random.Generator, rows: int, n: int = N) -> np.ndarray:
    """Heavy-tailed (student-t) weights, rows of different scale and a few hot
    input columns, as bf16 values."""
    x = rng.standard_t(3, size=(rows, n)) * 0.02
    x *= rng.lognormal(0.0, 0.7, size=(rows, 1))
    x[:, rng.choice(n, 6, replace=False)] *= rng.uniform(4, 12, size=6)
    return bf16_values(x)


def edge_rows(rng: np.random.Generator, n: int = N) -> np.ndarray:
    """Rows whose every block is an edge case for some quantizer."""
    normal = rng.standard_normal((n,))
    rows = {
        "zeros": np.zeros(n),
        "negative zeros": np.full(n, -0.0),
        "signed zeros": np.where(rng.random(n) < 0.5, -0.0, 0.0),
        "leading -0": np.where(np.arange(n) % 16 == 0, -0.0, 0.0),
        "constant": np.full(n, 0.5),
        "negative constant": np.full(n, -0.25),
        "tiny 1e-30": normal * 1e-30,
        "subnormal": normal * 1e-39,
        "small 1e-8": normal * 1e-8,
        "outlier": np.where(np.arange(n) % 32 == 7, 1e4, normal * 0.01),
        "negative outlier": np.where(np.arange(n) % 256 == 100, -3e3, normal * 0.01),
        "all negative": -np.abs(normal) * 0.02,
        "all positive": np.abs(normal) * 0.02 + 0.01,
        "ties": rng.integers(-8, 8, n) * 0.125,
        "sign-tied max": np.where(np.arange(n) % 2 == 0, 1.0, -1.0) * (np.arange(n) % 16 < 2) + normal * 0.01,
        "zero groups": np.where((np.arange(n) // 16) % 3 == 0, 0.0, normal * 0.02),
    }
    return bf16_values(np.stack(list(rows.values())))


def importance(rng: np.random.Generator, n: int = N) -> np.ndarray:
    """An imatrix-like column importance: mean squared activations, heavy
    tailed, with a few hot and a few dead (zero) columns."""
    qw = rng.lognormal(0.0, 1.5, size=n)
    qw[rng.choice(n, 8, replace=False)] *= 50
    qw[rng.choice(n, 8, replace=False)] = 0
    return qw.astype(np.float32)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    rng = np.random.default_rng(20240928)
    return np.concatenate([trained_weights(rng, 384), edge_rows(rng)])


@pytest.fixture(scope="module")
def imatrix() -> np.ndarray:
    return importance(np.random.default_rng(7))


def block_errors(x: np.ndarray, raw: np.ndarray, qtype: QT, qw: np.ndarray | None) -> np.ndarray:
    """Per-block squared dequantization error (imatrix-weighted when given)."""
    bs = block_size(qtype)
    err = (dequantize(raw, qtype, x.shape) - x) ** 2
    if qw is not None:
        err = err * qw
    return err.reshape(-1, bs).sum(1)


def assert_same_blocks(ours: np.ndarray, ggml: np.ndarray, qtype: QT, backend: str, device: str = "cpu",
                       x: np.ndarray | None = None, qw: np.ndarray | None = None) -> np.ndarray:
    """Every block equal to ggml's on the CPU, K-quants included (both
    backends measure 100%).  On another device the spec's allowance holds for
    the K-quants: up to 0.1% of super-blocks may differ (a fused multiply-add
    can flip a near-tie), and, given ``x``, none with a larger error than
    ggml's.  Returns which blocks are identical."""
    ts = type_size(qtype)
    same = (ours.reshape(-1, ts) == ggml.reshape(-1, ts)).all(1)
    differ = f"{qtype.name} {backend} on {device}: {(~same).sum()} of {same.size} blocks differ from ggml"
    if device == "cpu" or qtype not in FITTED:
        assert same.all(), f"{differ}, the first is block {np.argmin(same)}"
        return same
    assert same.mean() >= 0.999, f"{differ}, more than the 0.1% allowed off the CPU"
    if x is not None:
        worse = block_errors(x, ours, qtype, qw) > block_errors(x, ggml, qtype, qw)
        assert not (worse & ~same).any(), f"{differ}, one with a larger error than ggml's"
    return same


# ---------------------------------------------------------------- the oracle

@oracle_test
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize(("qtype", "backend", "device"), with_devices(SUPPORTED_TYPES))
def test_identical_to_ggml(qtype: QT, backend: str, device: str, with_imatrix: bool, data: np.ndarray,
                           imatrix: np.ndarray):
    qw = imatrix if with_imatrix else None
    ours = quantize(data, qtype, qw, name="test", device=device, backend=backend)
    same = assert_same_blocks(ours, ORACLE.quantize(data, qtype, qw), qtype, backend, device, data, qw)
    print(f"\n{qtype.name:5} {backend:5} {device:4} {'imatrix' if qw is not None else 'ref':7} "
          f"{same.mean():9.4%} of {same.size} blocks identical to ggml")


@oracle_test
@pytest.mark.parametrize("qtype", ALL_QUANTS, ids=lambda t: t.name)
def test_roundtrip_through_gguf_py_matches_ggml(qtype: QT, data: np.ndarray):
    """gguf-py decodes our bytes to exactly what it decodes ggml's to."""
    ours = dequantize(quantize(data, qtype), qtype, data.shape)
    ggml = dequantize(ORACLE.quantize(data, qtype), qtype, data.shape)
    bs = block_size(qtype)
    same = (ours.reshape(-1, bs) == ggml.reshape(-1, bs)).all(1)
    assert same.all(), f"{qtype.name}: {(~same).sum()} of {same.size} blocks decode differently from ggml's"
    assert np.isfinite(ours).all()


@oracle_test
@pytest.mark.slow
@pytest.mark.parametrize(("qtype", "backend", "device"), with_devices(FITTED))
def test_full_size_layer_identical_to_ggml(qtype: QT, backend: str, device: str):
    """A 3072x3072 layer (36,864 super-blocks) of trained-looking weights."""
    x = trained_weights(np.random.default_rng(3072), 3072, 3072)
    ours = quantize(x, qtype, device=device, backend=backend)
    same = assert_same_blocks(ours, ORACLE.quantize(x, qtype, threads=2), qtype, backend, device, x)
    print(f"\n{qtype.name} {backend} {device}: {same.mean():.5%} of {same.size} super-blocks identical")


@oracle_test
@pytest.mark.parametrize(("qtype", "backend"), with_backends(LEGACY_QUANTS | FITTED))
def test_chunks_starting_inside_a_row_match_ggml(qtype: QT, backend: str):
    """Rows of 3 super-blocks (24 legacy blocks): the 2^18-element chunks the
    encoders work in start inside a row, so each block must find its own
    imatrix entries (and, for the legacy types, its row's mean square)."""
    rng = np.random.default_rng(768)
    x = trained_weights(rng, 700, 768)
    qw = importance(rng, 768)
    assert_same_blocks(quantize(x, qtype, qw, backend=backend), ORACLE.quantize(x, qtype, qw), qtype, backend)


@needs_numba
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", ALL_QUANTS, ids=lambda t: t.name)
def test_backends_write_the_same_bytes(qtype: QT, with_imatrix: bool, data: np.ndarray, imatrix: np.ndarray):
    """torch and numba agree block for block, edge rows included (no oracle
    needed: this holds wherever the tests run)."""
    qw = imatrix if with_imatrix else None
    assert np.array_equal(quantize(data, qtype, qw, backend="numba"), quantize(data, qtype, qw, backend="torch"))


# ---------------------------------------------------------------- without the oracle

@pytest.mark.parametrize("qtype", EXACT_TYPES, ids=lambda t: t.name)
def test_matches_gguf_py_where_it_is_exact(qtype: QT):
    """gguf-py's numpy encoders are bit-exact ports of ggml for these types."""
    x = trained_weights(np.random.default_rng(1), 64)
    theirs = gguf.quants.quantize(x, qtype).view(np.uint8).reshape(64, -1)
    assert np.array_equal(quantize(x, qtype), theirs)


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES, key=int), ids=lambda t: t.name)
def test_shape_dtype_and_bytes_per_row(qtype: QT):
    x = torch.from_numpy(trained_weights(np.random.default_rng(2), 6)).reshape(2, 3, N)
    out = quantize(x.bfloat16(), qtype)
    assert out.dtype == np.uint8
    assert out.shape == (2, 3, bytes_per_row(qtype, N))
    assert bytes_per_row(qtype, N) == N // block_size(qtype) * type_size(qtype)


def test_type_sets():
    assert K_QUANTS == {QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K}
    assert LEGACY_QUANTS == {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0}
    assert IQ_QUANTS == {QT.IQ4_NL, QT.IQ4_XS}
    assert type_size(QT.IQ4_XS) == 136 and block_size(QT.IQ4_XS) == 256
    assert type_size(QT.IQ4_NL) == 18 and block_size(QT.IQ4_NL) == 32
    assert type_size(QT.Q4_K) == 144 and block_size(QT.Q4_K) == 256


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_1, QT.BF16], ids=lambda t: t.name)
def test_bf16_tensor_equals_its_float32_values(qtype: QT):
    x = torch.from_numpy(trained_weights(np.random.default_rng(3), 16))
    assert np.array_equal(quantize(x.bfloat16(), qtype), quantize(x.numpy(), qtype))


def test_numba_is_the_default_on_the_cpu_when_installed(monkeypatch):
    cpu = torch.device("cpu")
    default = quants_module._numba_kernels(QT.Q4_K, cpu, None, "w")
    assert (default is not None) == HAS_NUMBA
    assert quants_module._numba_kernels(QT.Q4_K, torch.device("cuda"), None, "w") is None
    assert quants_module._numba_kernels(QT.F16, cpu, None, "w") is None
    assert quants_module._numba_kernels(QT.Q4_K, cpu, "torch", "w") is None
    monkeypatch.setattr(quants_module, "_cpu_backend", lambda: None)        # numba missing
    assert quants_module._numba_kernels(QT.Q4_K, cpu, None, "w") is None
    with pytest.raises(QuantizationError, match="tensor w: the numba backend needs numba"):
        quantize(np.ones((1, 256), dtype=np.float32), QT.Q4_K, name="w", backend="numba")


@needs_numba
def test_numba_backend_refuses_what_it_cannot_do():
    x = np.ones((1, 256), dtype=np.float32)
    with pytest.raises(QuantizationError, match="tensor w: the numba backend runs on the CPU, not cuda"):
        quantize(x, QT.Q4_K, name="w", device="cuda", backend="numba")
    with pytest.raises(QuantizationError, match="tensor w: the numba backend has no F16 encoder"):
        quantize(x, QT.F16, name="w", backend="numba")


def test_unknown_backend_is_refused():
    with pytest.raises(QuantizationError, match="unknown quantization backend 'numpy'; use one of torch, numba"):
        quantize(np.ones((1, 256), dtype=np.float32), QT.Q4_K, name="w", backend="numpy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input_equals_its_contiguous_copy(backend: str):
    x = torch.from_numpy(trained_weights(np.random.default_rng(8), 16, 2 * N))[:, :N]
    assert np.array_equal(quantize(x, QT.Q4_K, backend=backend), quantize(x.contiguous(), QT.Q4_K, backend=backend))


def test_devices_spelled_any_way_agree():
    x = trained_weights(np.random.default_rng(4), 8)
    ref = quantize(x, QT.Q6_K)
    for device in ("cpu", torch.device("cpu")):
        assert np.array_equal(quantize(x, QT.Q6_K, device=device), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_worker_pool_leaves_the_callers_thread_count_alone(backend: str):
    threads = torch.get_num_threads()
    x = trained_weights(np.random.default_rng(6), 600)        # several chunks
    one_chunk_at_a_time = np.concatenate([quantize(x[i:i + 100], QT.Q5_K, backend=backend)
                                          for i in range(0, 600, 100)])
    assert np.array_equal(quantize(x, QT.Q5_K, backend=backend), one_chunk_at_a_time)
    assert torch.get_num_threads() == threads


# Relative RMS error ceilings on these student-t weights, about 1.15x what the
# ggml-identical encoders give without an imatrix (a regression guard that
# needs no oracle).
RMSE_CEILING = {QT.Q2_K: 0.41, QT.Q3_K: 0.225, QT.Q4_K: 0.11, QT.Q5_K: 0.055, QT.Q6_K: 0.03,
                QT.Q4_0: 0.155, QT.Q4_1: 0.12, QT.Q5_0: 0.08, QT.Q5_1: 0.057, QT.Q8_0: 0.01,
                QT.IQ4_NL: 0.12, QT.IQ4_XS: 0.12}


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", ALL_QUANTS, ids=lambda t: t.name)
def test_roundtrip_error_is_bounded(qtype: QT, with_imatrix: bool):
    rng = np.random.default_rng(5)
    x = trained_weights(rng, 32)
    qw = importance(rng) if with_imatrix else None
    y = dequantize(quantize(x, qtype, qw), qtype, x.shape)
    weight = 1.0 if qw is None else qw      # with an imatrix the weighted error is what is minimised
    assert np.sqrt((weight * (y - x) ** 2).mean() / (weight * x ** 2).mean()) < RMSE_CEILING[qtype]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("qtype", "backend"), with_backends([QT.F16, QT.Q8_0, QT.Q4_K]))
def test_nan_or_inf_is_refused(qtype: QT, backend: str, bad: float):
    x = np.zeros((600, 512), dtype=np.float32)   # several chunks; the bad value in the last
    x[-1, -1] = bad
    with pytest.raises(QuantizationError, match=r"tensor blk\.0\.w: 1 NaN/Inf value\(s\) in the weights"):
        quantize(x, qtype, name="blk.0.w", backend=backend)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K], ids=lambda t: t.name)
def test_row_length_must_fill_blocks(qtype: QT):
    with pytest.raises(QuantizationError, match=rf"tensor odd: row length 100 .* {qtype.name} block size"):
        quantize(np.ones((4, 100), dtype=np.float32), qtype, name="odd")


def test_imatrix_must_match_the_row_length():
    with pytest.raises(QuantizationError, match="imatrix has shape"):
        quantize(np.ones((4, 256), dtype=np.float32), QT.Q4_K, np.ones(255, dtype=np.float32), name="w")


def test_f16_overflow_is_refused():
    with pytest.raises(QuantizationError, match="F16 range"):
        quantize(np.full((1, 32), 70000.0, dtype=np.float32), QT.F16, name="big")


def test_unsupported_type_and_input_are_refused():
    with pytest.raises(QuantizationError, match="cannot encode IQ2_XXS"):
        quantize(np.ones((1, 256), dtype=np.float32), QT.IQ2_XXS)
    with pytest.raises(QuantizationError, match="floating-point"):
        quantize(np.ones((1, 256), dtype=np.int32), QT.Q8_0)


# ---------------------------------------------------------------- the numba kernels' scalar helpers

@pytest.fixture(scope="module")
def cpu():
    pytest.importorskip("numba")
    from qconvert.codecs.gguf import _cpu_core
    return _cpu_core


def test_cpu_fp16_to_fp32_is_exact(cpu):
    halves = np.arange(1 << 16, dtype=np.uint16)
    expected = halves.view(np.float16).astype(np.float32)
    got = np.array([cpu.fp16_to_fp32(int(h)) for h in halves], dtype=np.float32)
    nan = np.isnan(expected)
    assert np.array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))
    assert np.isnan(got[nan]).all()


def test_cpu_fp32_to_fp16_rounds_to_nearest_even(cpu):
    """Every half, the midpoints between neighbouring halves (ties, also into
    the subnormals and up to inf) and their float32 neighbours, random bit
    patterns: as numpy's correctly rounded conversion; NaN -> sign | 0x7E00."""
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    finite = np.unique(halves[np.isfinite(halves)].astype(np.float64))
    mids = np.append((finite[1:] + finite[:-1]) / 2, 65520.0).astype(np.float32)
    values = np.concatenate([
        halves, mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
        np.random.default_rng(16).integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32).view(np.float32),
    ])
    got = np.array([cpu.fp32_to_fp16(v) for v in values], dtype=np.uint16)
    nan = np.isnan(values)
    with np.errstate(over="ignore"):
        expected = values[~nan].astype(np.float16).view(np.uint16)
    assert np.array_equal(got[~nan], expected)
    assert np.array_equal(got[nan], np.where(np.signbit(values[nan]), 0xFE00, 0x7E00))


def test_cpu_rounding_helpers_match_c(cpu):
    f = np.float32
    # nearest_int: ggml's bit trick, half to even, and what it gives out of range
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -0.0, 4194303.0, 4194304.5, 5e6, -5e6, 1e20, np.inf, -np.inf, np.nan], f)
    trick = ((v + f(12582912.0)).view(np.int32) & 0x007FFFFF) - 0x00400000
    assert [cpu.nearest_int(a) for a in v] == trick.tolist()
    # roundf: half away from zero, exact near 0.5 and 2^23
    v = np.array([0.49999997, 0.5, 1.5, 2.5, -0.5, -2.5, -0.49999997, 8388607.5, 8388609.0, 1e10, -0.0], f)
    assert [cpu.roundf(a) for a in v] == (np.sign(v) * np.floor(np.abs(v.astype(np.float64)) + 0.5)).tolist()
    # cvtt: C's truncating cast as x86 does it, 0x80000000 when out of range
    v = np.array([1.9, -1.9, 2147483520.0, 2147483648.0, -2147483648.0, np.inf, np.nan], f)
    assert [cpu.cvtt(a) for a in v] == [1, -1, 2147483520, -2 ** 31, -2 ** 31, -2 ** 31, -2 ** 31]
    # int8_of: a store into int8_t wraps modulo 256
    assert [cpu.int8_of(i) for i in (127, 128, 255, 256, -129, 300, -2 ** 31)] == [127, -128, -1, 0, 127, 44, 0]


def test_zero_element_tensors_encode_to_no_bytes():
    """Edit-2511's `__index_timestep_zero__` marker is a tensor of shape [0]."""
    assert quantize(torch.empty(0), QT.F32).shape == (0,)
    assert quantize(torch.empty(0, 256), QT.Q4_K).shape == (0, 144)


def test_f16_just_past_its_range_is_refused_too():
    # 65510 would round back to 65504 rather than overflow; it is still out of range.
    with pytest.raises(QuantizationError, match="F16 range"):
        quantize(np.full((1, 32), 65510.0, dtype=np.float32), QT.F16, name="edge")
    assert quantize(np.full((1, 32), 65504.0, dtype=np.float32), QT.F16).shape == (1, 64)


def test_a_recycled_output_buffer_gets_the_same_bytes():
    x = torch.randn(8, 512).bfloat16()
    fresh = quantize(x, QT.Q8_0)
    buffer = np.full(fresh.nbytes + 100, 0xAB, dtype=np.uint8)      # larger than needed, with stale bytes
    assert np.array_equal(quantize(x, QT.Q8_0, out=buffer), fresh)
    with pytest.raises(QuantizationError, match="at least"):
        quantize(x, QT.Q8_0, out=np.empty(fresh.nbytes - 1, np.uint8))
