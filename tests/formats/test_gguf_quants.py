"""qconvert's GGUF encoders against ggml itself and against gguf-py.

The oracle tests call ``ggml_quantize_chunk`` from the libggml that
llama-cpp-python ships (``tests/ggml_oracle.py``) and compare every block.
Run with ``-s`` to see the identity rate of each type.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from qconvert.errors import QuantizationError
from qconvert.formats.gguf.quants import (
    FLOAT_TYPES,
    K_QUANTS,
    LEGACY_QUANTS,
    SUPPORTED_TYPES,
    block_size,
    bytes_per_row,
    dequantize,
    quantize,
    type_size,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ggml_oracle  # noqa: E402

ORACLE, ORACLE_MISSING = ggml_oracle.load()
needs_oracle = [pytest.mark.oracle,
                pytest.mark.skipif(ORACLE is None, reason=f"ggml oracle unavailable: {ORACLE_MISSING}")]


def oracle_test(fn):
    for mark in needs_oracle:
        fn = mark(fn)
    return fn

EXACT_TYPES = sorted(FLOAT_TYPES - {QT.F32} | LEGACY_QUANTS, key=int)
ALL_QUANTS = sorted(LEGACY_QUANTS | K_QUANTS, key=int)
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


# ---------------------------------------------------------------- the oracle

@oracle_test
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES, key=int), ids=lambda t: t.name)
def test_identical_to_ggml(qtype: QT, with_imatrix: bool, data: np.ndarray, imatrix: np.ndarray):
    qw = imatrix if with_imatrix else None
    ours = quantize(data, qtype, qw, name="test")
    ggml = ORACLE.quantize(data, qtype, qw)
    ts = type_size(qtype)
    same = (ours.reshape(-1, ts) == ggml.reshape(-1, ts)).all(1)
    print(f"\n{qtype.name:5} {'imatrix' if qw is not None else 'ref':7} "
          f"{same.mean():9.4%} of {same.size} blocks identical to ggml")
    if qtype not in K_QUANTS:
        assert same.all(), f"{(~same).sum()} blocks differ from ggml"
        return
    assert same.mean() >= 0.999
    worse = block_errors(data, ours, qtype, qw) > block_errors(data, ggml, qtype, qw)
    assert not (worse & ~same).any(), "a differing block has a larger error than ggml's"


@oracle_test
@pytest.mark.parametrize("qtype", ALL_QUANTS, ids=lambda t: t.name)
def test_roundtrip_through_gguf_py_matches_ggml(qtype: QT, data: np.ndarray):
    """gguf-py decodes our bytes to exactly what it decodes ggml's to."""
    ours = dequantize(quantize(data, qtype), qtype, data.shape)
    ggml = dequantize(ORACLE.quantize(data, qtype), qtype, data.shape)
    bs = block_size(qtype)
    same = (ours.reshape(-1, bs) == ggml.reshape(-1, bs)).all(1)
    assert same.mean() >= (0.999 if qtype in K_QUANTS else 1.0)
    assert np.isfinite(ours).all()


@oracle_test
@pytest.mark.slow
@pytest.mark.parametrize("qtype", sorted(K_QUANTS, key=int), ids=lambda t: t.name)
def test_full_size_layer_identical_to_ggml(qtype: QT):
    """A 3072x3072 layer (36,864 super-blocks) of trained-looking weights."""
    x = trained_weights(np.random.default_rng(3072), 3072, 3072)
    ts = type_size(qtype)
    same = (quantize(x, qtype).reshape(-1, ts) == ORACLE.quantize(x, qtype, threads=2).reshape(-1, ts)).all(1)
    print(f"\n{qtype.name}: {same.mean():.5%} of {same.size} super-blocks identical")
    assert same.mean() >= 0.999


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
    assert type_size(QT.Q4_K) == 144 and block_size(QT.Q4_K) == 256


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_1, QT.BF16], ids=lambda t: t.name)
def test_bf16_tensor_equals_its_float32_values(qtype: QT):
    x = torch.from_numpy(trained_weights(np.random.default_rng(3), 16))
    assert np.array_equal(quantize(x.bfloat16(), qtype), quantize(x.numpy(), qtype))


def test_devices_spelled_any_way_agree():
    x = trained_weights(np.random.default_rng(4), 8)
    ref = quantize(x, QT.Q6_K)
    for device in ("cpu", torch.device("cpu")):
        assert np.array_equal(quantize(x, QT.Q6_K, device=device), ref)


def test_worker_pool_leaves_the_callers_thread_count_alone():
    threads = torch.get_num_threads()
    x = trained_weights(np.random.default_rng(6), 600)        # several chunks
    one_chunk_at_a_time = np.concatenate([quantize(x[i:i + 100], QT.Q5_K) for i in range(0, 600, 100)])
    assert np.array_equal(quantize(x, QT.Q5_K), one_chunk_at_a_time)
    assert torch.get_num_threads() == threads


# Relative RMS error ceilings on these student-t weights, about 1.15x what the
# ggml-identical encoders give without an imatrix (a regression guard that
# needs no oracle).
RMSE_CEILING = {QT.Q2_K: 0.41, QT.Q3_K: 0.225, QT.Q4_K: 0.11, QT.Q5_K: 0.055, QT.Q6_K: 0.03,
                QT.Q4_0: 0.155, QT.Q4_1: 0.12, QT.Q5_0: 0.08, QT.Q5_1: 0.057, QT.Q8_0: 0.01}


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
@pytest.mark.parametrize("qtype", [QT.F16, QT.Q8_0, QT.Q4_K], ids=lambda t: t.name)
def test_nan_or_inf_is_refused(qtype: QT, bad: float):
    x = np.zeros((600, 512), dtype=np.float32)   # several chunks; the bad value in the last
    x[-1, -1] = bad
    with pytest.raises(QuantizationError, match=r"tensor blk\.0\.w: contains NaN/Inf"):
        quantize(x, qtype, name="blk.0.w")


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
    with pytest.raises(QuantizationError, match="cannot encode IQ4_NL"):
        quantize(np.ones((1, 256), dtype=np.float32), QT.IQ4_NL)
    with pytest.raises(QuantizationError, match="floating-point"):
        quantize(np.ones((1, 256), dtype=np.int32), QT.Q8_0)
