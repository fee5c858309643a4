"""ggml's quantizers compiled with numba, for the CPU (``types.GgmlType.cpu`` names each type's kernels).

Split by what a reader looks for: ``_cpu_core`` (float32 scalar helpers,
ggml's scale fitting, groups in lanes), ``_cpu_kquants`` (Q2_K ... Q6_K),
``_cpu_legacy`` (Q8_0, Q4_0 ... Q5_1) and ``_cpu_iquants`` (IQ4_NL, IQ4_XS).

The torch port (``_kquants``/``_legacy``/``_fit``) spends a memory pass on
every float32 operation, while ggml's routines are short loops over 16-32
values that stay in registers.  Here they are compiled loops again, one
function per ggml routine under ggml's name (``make_qkx2_quants``,
``quantize_row_q4_k_ref``...), byte-identical to ggml.  On the same cores they
run 3-15x faster than the torch port and, measured against ggml's own C,
1.1-1.3x faster for Q4_0/Q4_1 (ggml's simplest loops; here the copies into
and out of the lanes take half the time) and 1.5-7x for every other type.

Where the speed comes from: the fitting routines take many *groups* (the
16/32-value sub-blocks that ggml fits one after the other) at once, one group
per SIMD lane.  Their values sit position-major, ``X[i, g]`` being element
``i`` of group ``g``; every loop over ``g`` repeats one of ggml's steps for
each group, and ggml's branches become per-group selects, so each group still
goes through exactly ggml's sequence of float32 operations.  What remains per
block (scale codes, f16 storage, packing) indexes ``y[b, ...]`` instead of
slicing rows: numba reference-counts every array view, which costs as much as
a small block's work.

Exactness rules (the bytes must equal ``ggml_quantize_chunk``'s):

* every value is ``np.float32`` and every operation float32, in ggml's order
  (``w*x*l`` is ``(w*x)*l``, sums run element by element); numba promotes a
  float32 mixed with a Python float or an int to float64, so constants are
  ``F32(...)`` and integers meet floats as ``F32(l)``;
* no ``fastmath``, and numba emits no ``contract`` flag, so LLVM fuses no
  multiply-add; ``error_model="numpy"`` gives IEEE division (x/0 = inf)
  instead of a ZeroDivisionError;
* ``np.sqrt`` of a float32 is the correctly rounded ``sqrtss``, as C ``sqrtf``;
  divisions are true divisions, never a multiply by a reciprocal;
* :func:`nearest_int` is ggml's bit trick itself, so it matches ggml even
  outside its exact range; C's truncating casts and ``roundf`` are spelled
  out (:func:`cvtt`, :func:`roundf`); f16 conversions work on the bits.

Entry points: ``quantize_row_<type>_ref(x, y)`` takes a run of blocks ``x``
(``(nb, block)`` float32, or BF16 bits as uint16, C-contiguous) and writes their ``(nb, type_size)``
bytes to ``y``, like ggml's function of the same name.
``quantize_row_<type>_impl(x, y, qw, b0)`` is ggml's imatrix path; ggml calls
it a row at a time, here ``qw`` is the row's importance as
``(blocks_per_row, block)`` and ``b0`` the flat index of ``x``'s first block,
so a run may start inside a row; the legacy ones also take ``sigma2``, each
row's ``sum(x*x)/n_per_row``.  All return False when ``x`` holds NaN or Inf
(ggml would quantize garbage; the caller refuses the tensor) and release the
GIL, so runs of blocks go to a thread pool.  They are plain Python calling one
compiled kernel per family (``quantize_k4`` serves Q4_K and Q5_K, ``_ref`` and
``_impl``): that halves the compile on first use (30-50 s for every type,
2-13 s per family), after which numba's on-disk cache loads them in about a
second.
"""

from __future__ import annotations

# Importing the kernel modules is how ``quants._cpu_backend`` finds out whether numba works here.
from qconvert.codecs.gguf._cpu_iquants import (  # noqa: F401
    quantize_row_iq4_nl_impl,
    quantize_row_iq4_nl_ref,
    quantize_row_iq4_xs_impl,
    quantize_row_iq4_xs_ref,
)
from qconvert.codecs.gguf._cpu_kquants import (  # noqa: F401
    quantize_row_q2_k_impl,
    quantize_row_q2_k_ref,
    quantize_row_q3_k_impl,
    quantize_row_q3_k_ref,
    quantize_row_q4_k_impl,
    quantize_row_q4_k_ref,
    quantize_row_q5_k_impl,
    quantize_row_q5_k_ref,
    quantize_row_q6_k_impl,
    quantize_row_q6_k_ref,
)
from qconvert.codecs.gguf._cpu_legacy import (  # noqa: F401
    quantize_row_q4_0_impl,
    quantize_row_q4_0_ref,
    quantize_row_q4_1_impl,
    quantize_row_q4_1_ref,
    quantize_row_q5_0_impl,
    quantize_row_q5_0_ref,
    quantize_row_q5_1_impl,
    quantize_row_q5_1_ref,
    quantize_row_q8_0_ref,
)
