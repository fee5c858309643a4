"""The GGML storage types qconvert writes, one entry each: what ``quants.quantize`` dispatches on.

Each entry names ggml's two quantizers for the type, ported twice: in torch (``_legacy``, ``_kquants``:
any device) and compiled with numba (``_cpu``: the CPU, 3-15x faster), ``ref`` (ggml's
``quantize_row_*_ref``, no importance matrix) and ``impl`` (``quantize_row_*_impl``, with one; Q8_0 has
none, as in ggml).  A new type (IQ4_NL was) is its kernels' modules, one entry here and its ggml-oracle
tests; ``quants``, the writer, the type policy's sizes, inspect and verify need no change (a llama.cpp level
that uses it is a line in ``formats/gguf/policy.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from gguf import GGMLQuantizationType as QT

from qconvert.codecs.gguf import _iquants as iq
from qconvert.codecs.gguf import _kquants as kq
from qconvert.codecs.gguf import _legacy as lq

# IQ: a codebook, not a linear scale; its imatrix path takes blocks' importances as K's does
FLOAT, LEGACY, K, IQ = "float", "legacy", "k", "iq"


@dataclass(frozen=True)
class GgmlType:
    qtype: QT
    family: str  # FLOAT (a checked cast), LEGACY (impl also takes each row's mean square), K or IQ
    ref: Callable | None = None  # torch: (B, block) float32 blocks -> (B, type_size) uint8
    impl: Callable | None = None  # torch, with an importance matrix (blocks, importance[, row mean squares])
    cpu: str | None = None  # "module:name": numba's quantize_row_{name}_ref (and _impl, if any) in module
    cpu_chunk: int = 1 << 18  # elements per CPU work item (measured; see ``quants``)

    @property
    def name(self) -> str:
        return self.qtype.name


TYPES: dict[QT, GgmlType] = {t.qtype: t for t in (
    GgmlType(QT.F32, FLOAT),
    GgmlType(QT.F16, FLOAT),
    GgmlType(QT.BF16, FLOAT),
    GgmlType(QT.Q8_0, LEGACY, lq.quantize_q8_0, None, "_cpu_legacy:q8_0"),
    GgmlType(QT.Q4_0, LEGACY, lq.quantize_q4_0, lq.quantize_q4_0_impl, "_cpu_legacy:q4_0"),
    GgmlType(QT.Q4_1, LEGACY, lq.quantize_q4_1, lq.quantize_q4_1_impl, "_cpu_legacy:q4_1"),
    GgmlType(QT.Q5_0, LEGACY, lq.quantize_q5_0, lq.quantize_q5_0_impl, "_cpu_legacy:q5_0"),
    GgmlType(QT.Q5_1, LEGACY, lq.quantize_q5_1, lq.quantize_q5_1_impl, "_cpu_legacy:q5_1"),
    GgmlType(QT.Q2_K, K, kq.quantize_q2_k, kq.quantize_q2_k_impl, "_cpu_kquants:q2_k"),
    # Q3_K's coordinate descent runs many small rounds and prefers larger chunks
    GgmlType(QT.Q3_K, K, kq.quantize_q3_k, kq.quantize_q3_k_impl, "_cpu_kquants:q3_k", cpu_chunk=1 << 19),
    GgmlType(QT.Q4_K, K, kq.quantize_q4_k, kq.quantize_q4_k_impl, "_cpu_kquants:q4_k"),
    GgmlType(QT.Q5_K, K, kq.quantize_q5_k, kq.quantize_q5_k_impl, "_cpu_kquants:q5_k"),
    GgmlType(QT.Q6_K, K, kq.quantize_q6_k, kq.quantize_q6_k_impl, "_cpu_kquants:q6_k"),
    GgmlType(QT.IQ4_NL, IQ, iq.quantize_iq4_nl, iq.quantize_iq4_nl_impl, "_cpu_iquants:iq4_nl"),
    GgmlType(QT.IQ4_XS, IQ, iq.quantize_iq4_xs, iq.quantize_iq4_xs_impl, "_cpu_iquants:iq4_xs"),
)}


def of_family(family: str) -> frozenset:
    return frozenset(q for q, t in TYPES.items() if t.family == family)


def cpu_kernels(qtype: QT) -> tuple | None:
    """``(ref, impl or None)``: the numba kernels of ``qtype``, or None.  Imported when first asked for (numba
    takes a moment to load; ``quants._cpu_backend`` checks it works first)."""
    t = TYPES.get(qtype)
    if t is None or t.cpu is None:
        return None
    module, name = t.cpu.split(":")
    kernels = importlib.import_module(f"qconvert.codecs.gguf.{module}")
    return getattr(kernels, f"quantize_row_{name}_ref"), getattr(kernels, f"quantize_row_{name}_impl", None)
