"""ggml's quantizers compiled with numba, for the CPU.

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

import numpy as np
from numba import njit, types
from numba.extending import overload

F32 = np.float32
_JIT = dict(cache=True, nogil=True, error_model="numpy")

_ZERO = F32(0.0)
_ONE = F32(1.0)
_MAGIC = F32(12582912.0)        # 1.5 * 2^23, nearest_int's rounding constant
GROUP_MAX_EPS = F32(1e-15)
QK_K = 256
# Groups fitted together, one per SIMD lane: 256 keeps X, W and the codes
# (n x 256 float32 each) in L2 while each loop over the lanes runs long.  The
# legacy types' light per-block work runs faster from L1: 128 blocks at a time
# (measured 15-40% faster than 256 there; the K-quants' fits are 10-15% faster
# at 256).
LANES = 256
LEGACY_LANES = 128
_NO_IMATRIX = np.zeros((1, QK_K), F32)        # the qw argument of the _ref paths


# ---------------------------------------------------------------- scalar helpers

@njit(**_JIT)
def nearest_int(fval):
    """ggml ``nearest_int``: add 1.5*2^23 (the float32 add rounds half to
    even) and read the integer off the mantissa bits, bit for bit, including
    the values ggml returns outside ``|fval| <= 4194303``."""
    val = fval + _MAGIC
    return np.int32((F32(val).view(np.int32) & 0x007FFFFF) - 0x00400000)


@njit(**_JIT)
def rounded(v, lo, hi):
    """``MAX(lo, MIN(hi, nearest_int(v)))`` as float32 (the codes are small
    integers, exact in float32; float lanes keep the group loops in SIMD)."""
    return min(max(F32(nearest_int(v)), lo), hi)


@njit(**_JIT)
def cvtt(v):
    """C's float -> int conversion as x86 ``cvttss2si`` does it: truncation,
    and 0x80000000 for NaN or out-of-range values (ggml's legacy quantizers
    cast ``x*id + 8.5f`` and friends, with ``id`` infinite for tiny blocks).
    A select on an int32, so loops of it stay in 8-lane SIMD (an early
    return, or an int64 result, halves the lanes of the legacy code loops)."""
    return np.int32(v) if abs(v) < F32(2147483648.0) else np.int32(-2147483648)


@njit(**_JIT)
def int8_of(i):
    """Store of an int into ``int8_t`` (wraps modulo 256), as int32: numba
    widens int32 arithmetic to int64, a cast keeps the lanes 32-bit."""
    return np.int32(np.int8(i))


@njit(**_JIT)
def roundf(v):
    """C ``roundf`` (half away from zero) of a float32, exactly: ``v - trunc(v)``
    is exact, and so is adding 1 to an integer below 2^23 (larger floats are
    integers already)."""
    t = np.trunc(v)
    if abs(v - t) >= F32(0.5):
        return t + (_ONE if v > 0 else -_ONE)
    return t


@njit(**_JIT)
def fp32_to_fp16(f):
    """``GGML_FP32_TO_FP16``: float32 -> binary16 bits, rounding to nearest
    even, overflowing to +-inf, NaN -> sign | 0x7E00.  Branch-free (selects
    only), so loops over lanes of it compile to SIMD."""
    bits = np.int64(F32(f).view(np.uint32))
    sign = (bits >> 16) & 0x8000
    a = bits & 0x7FFFFFFF
    e = a >> 23
    m = (a & 0x7FFFFF) | 0x800000                 # the significand, in units of 2^(e-150)
    # keep 11 bits for a normal half (e >= 113), fewer for a subnormal one
    # (units of 2^-24); below e = 102 nothing is left (shift 25: q = 0, rem < half)
    shift = min(max(126 - e, 13), 25)
    q = m >> shift
    rem = m & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    q += (rem > half) | ((rem == half) & (q & 1))
    # a normal half: exponent field e - 112 above the 10 fraction bits, q's
    # implicit bit (1024) counted in; a rounding carry moves into the exponent
    h = q + ((e - 113) << 10) if e >= 113 else q
    h = 0x7C00 if e >= 143 else h
    h = 0x7E00 if a > 0x7F800000 else h
    return sign | h


@njit(**_JIT)
def fp16_to_fp32(h):
    """``GGML_FP16_TO_FP32``: binary16 bits -> float32, exactly."""
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = F32(m) * F32(2.0 ** -24)                # exact
        return -v if sign else v
    if e == 31:
        bits = sign | 0x7F800000 | (m << 13)
    else:
        bits = sign | ((e + 112) << 23) | (m << 13)
    return np.uint32(bits).view(np.float32)


@njit(**_JIT)
def store_fp16(y, b, off, f):
    """``y[b, off:off+2] = GGML_FP32_TO_FP16(f)`` little-endian; returns the
    stored value as float32 (``GGML_FP16_TO_FP32`` of it)."""
    h = fp32_to_fp16(f)
    y[b, off] = h & 0xFF
    y[b, off + 1] = h >> 8
    return fp16_to_fp32(h)


# ---------------------------------------------------------------- scale fitting

@njit(**_JIT)
def first_abs_max(X, G, amax, mx):
    """Per group ggml's ``if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max =
    x[i]; }`` from ``amax = max = 0``: the largest |x| and the first value
    reaching it.  Written as two selects on the old ``amax``, the form LLVM
    turns into SIMD (a shared ``take`` flag is not, 9x slower)."""
    for g in range(G):
        amax[g] = _ZERO
        mx[g] = _ZERO
    for i in range(X.shape[0]):
        for g in range(G):
            a = abs(X[i, g])
            mx[g] = X[i, g] if a > amax[g] else mx[g]
            amax[g] = max(amax[g], a)


@njit(**_JIT)
def make_qx_quants(nmax, X, W, G, L, scale_out):
    """ggml ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` for ``G`` groups
    at once: ``X``/``W`` are position-major ``(n, >=G)`` (column ``g`` is group
    ``g``), the weights given (``x*x`` where ggml's ``qw`` is NULL).  Writes
    the scale of each group and its codes ``0..2*nmax-1`` (float32) to ``L``.

    Each group follows ggml's sequence exactly; ggml's branches become
    per-group selects, so the loops over ``g`` compile to SIMD, one group per
    lane.  The codes are rounded again at the end with the winning ``iscale``,
    which gives the values ggml stored when it adopted that candidate."""
    n = X.shape[0]
    fnmax = F32(nmax)
    st = np.empty((9, G), F32)
    amax, mx, iscale, best_is, scale = st[0], st[1], st[2], st[3], st[4]
    best, sumlx, suml2, offset = st[5], st[6], st[7], st[8]
    first_abs_max(X, G, amax, mx)
    for k in range(19):         # ggml's first fit, then is = -9..-1, 1..9
        step = 0 if k == 0 else (k - 10 if k <= 9 else k - 9)
        num = F32(-nmax) if k == 0 else -(fnmax + F32(0.1) * F32(step))
        for g in range(G):
            iscale[g] = num / mx[g]
        for g in range(G):
            sumlx[g] = _ZERO
            suml2[g] = _ZERO
        for i in range(n):
            for g in range(G):
                l = rounded(iscale[g] * X[i, g], F32(-nmax), fnmax - _ONE)
                sumlx[g] += W[i, g] * X[i, g] * l
                suml2[g] += W[i, g] * l * l
        if k == 0:
            for g in range(G):
                scale[g] = sumlx[g] / suml2[g] if suml2[g] != 0 else _ZERO
                best[g] = scale[g] * sumlx[g]
                best_is[g] = iscale[g]
        else:
            for g in range(G):
                take = (suml2[g] > 0) & (sumlx[g] * sumlx[g] > best[g] * suml2[g])
                new_scale = sumlx[g] / suml2[g]
                scale[g] = new_scale if take else scale[g]
                best[g] = new_scale * sumlx[g] if take else best[g]
                best_is[g] = iscale[g] if take else best_is[g]
    for g in range(G):
        zero = amax[g] < GROUP_MAX_EPS           # ggml's all-zero exit: scale 0, codes 0
        scale_out[g] = _ZERO if zero else scale[g]
        best_is[g] = _ZERO if zero else best_is[g]
        offset[g] = _ZERO if zero else fnmax
    for i in range(n):
        for g in range(G):
            L[i, g] = rounded(best_is[g] * X[i, g], F32(-nmax), fnmax - _ONE) + offset[g]


@njit(**_JIT)
def make_q3_quants(nmax, X, G, L, scale_out):
    """ggml ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` for ``G`` groups
    at once (position-major ``X`` as :func:`make_qx_quants`): the symmetric
    fit refined by coordinate descent.  Writes each group's scale and codes
    ``0..2*nmax-1`` (all 0 for an all-zero group) to ``L``.

    The first fit runs in lanes; the descent (up to 5 passes, stopping after
    one without change) runs group by group: its updates are rare, so
    branches that predict "no change" let the passes overlap, where per-lane
    selects would chain every step on the previous one (2.5x slower)."""
    n = X.shape[0]
    fnmax = F32(nmax)
    lo, hi = F32(-nmax), fnmax - _ONE
    st = np.empty((5, G), F32)
    amax, mx, iscale, sumlx, suml2 = st[0], st[1], st[2], st[3], st[4]
    first_abs_max(X, G, amax, mx)
    for g in range(G):
        iscale[g] = F32(-nmax) / mx[g]
        sumlx[g] = _ZERO
        suml2[g] = _ZERO
    for i in range(n):
        for g in range(G):
            l = rounded(iscale[g] * X[i, g], lo, hi)
            L[i, g] = l
            w = X[i, g] * X[i, g]
            sumlx[g] += w * X[i, g] * l
            suml2[g] += w * l * l
    for g in range(G):
        slx_g, sl2_g = sumlx[g], suml2[g]
        for _ in range(5):
            n_changed = 0
            for i in range(n):
                xi = X[i, g]
                w = xi * xi
                li = L[i, g]
                slx = slx_g - w * xi * li
                if slx > 0:
                    sl2 = sl2_g - w * li * li
                    new_l = rounded(xi * sl2 / slx, lo, hi)
                    if new_l != li:
                        slx += w * xi * new_l
                        sl2 += w * new_l * new_l
                        if sl2 > 0 and slx * slx * sl2_g > slx_g * slx_g * sl2:
                            L[i, g] = new_l
                            slx_g = slx
                            sl2_g = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        sumlx[g], suml2[g] = slx_g, sl2_g
    for g in range(G):
        zero = amax[g] < GROUP_MAX_EPS           # ggml's all-zero exit: scale 0, codes 0
        scale_out[g] = _ZERO if zero or not suml2[g] > 0 else sumlx[g] / suml2[g]
        iscale[g] = _ZERO if zero else _ONE      # (reused: 1 where the codes get + nmax)
    for i in range(n):
        for g in range(G):
            L[i, g] = (L[i, g] + fnmax) * iscale[g]


@njit(**_JIT)
def make_qkx2_quants(nmax, X, W, G, rmin, rdelta, nstep, use_mad, L, Laux, scale_out, min_out):
    """ggml ``make_qkx2_quants`` for ``G`` groups at once (position-major
    ``(n, >=G)`` ``X``/``W`` as :func:`make_qx_quants`); also ggml's
    ``make_qkx3_quants`` with weights (after ``if (min > 0) min = 0`` its
    ``max <= min`` is ``max == min``).  Writes each group's scale, ``the_min``
    and codes ``0..nmax`` (float32, to ``L``); ``Laux`` is scratch.

    As in ggml each candidate ``iscale`` spans ``max - min`` with the min
    *adopted* so far and rounds around it; the codes of the winner are rounded
    again at the end from the (iscale, min) pair it used."""
    n = X.shape[0]
    fnmax = F32(nmax)
    st = np.empty((17, G), F32)
    mn, mx, sum_w, sum_x, iscale, scale, best, flat = st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7]
    sl, sl2, sxl, D, ts, tm, err, win_is, win_mn = st[8], st[9], st[10], st[11], st[12], st[13], st[14], st[15], st[16]
    for g in range(G):
        mn[g] = X[0, g]
        mx[g] = X[0, g]
        sum_w[g] = W[0, g]
        sum_x[g] = W[0, g] * X[0, g]
    for i in range(1, n):
        for g in range(G):
            xi = X[i, g]
            mn[g] = xi if xi < mn[g] else mn[g]
            mx[g] = xi if xi > mx[g] else mx[g]
            sum_w[g] += W[i, g]
            sum_x[g] += W[i, g] * xi
    for g in range(G):
        mn[g] = _ZERO if mn[g] > 0 else mn[g]
        iscale[g] = fnmax / (mx[g] - mn[g])
        scale[g] = _ONE / iscale[g]
        best[g] = _ZERO
        win_is[g] = iscale[g]
        win_mn[g] = mn[g]
        flat[g] = _ONE if mx[g] == mn[g] else _ZERO   # ggml's early exit: scale 0, codes 0
    for i in range(n):
        for g in range(G):
            l = rounded(iscale[g] * (X[i, g] - mn[g]), _ZERO, fnmax)
            diff = scale[g] * l + mn[g] - X[i, g]
            diff = abs(diff) if use_mad else diff * diff
            best[g] += W[i, g] * diff
    for step in range(nstep + 1):
        num = rmin + rdelta * F32(step) + fnmax
        for g in range(G):
            iscale[g] = num / (mx[g] - mn[g])
            sl[g] = _ZERO
            sl2[g] = _ZERO
            sxl[g] = _ZERO
        for i in range(n):
            for g in range(G):
                l = rounded(iscale[g] * (X[i, g] - mn[g]), _ZERO, fnmax)
                Laux[i, g] = l
                wl = W[i, g] * l
                sl[g] += wl
                sl2[g] += wl * l
                sxl[g] += wl * X[i, g]
        for g in range(G):
            D[g] = sum_w[g] * sl2[g] - sl[g] * sl[g]
            this_scale = (sum_w[g] * sxl[g] - sum_x[g] * sl[g]) / D[g]
            this_min = (sl2[g] * sum_x[g] - sl[g] * sxl[g]) / D[g]
            clip = this_min > 0
            ts[g] = sxl[g] / sl2[g] if clip else this_scale
            tm[g] = _ZERO if clip else this_min
            err[g] = _ZERO
        for i in range(n):
            for g in range(G):
                diff = ts[g] * Laux[i, g] + tm[g] - X[i, g]
                diff = abs(diff) if use_mad else diff * diff
                err[g] += W[i, g] * diff
        for g in range(G):
            take = (D[g] > 0) & (err[g] < best[g]) & (flat[g] == 0)
            best[g] = err[g] if take else best[g]
            scale[g] = ts[g] if take else scale[g]
            win_is[g] = iscale[g] if take else win_is[g]
            win_mn[g] = mn[g] if take else win_mn[g]
            mn[g] = tm[g] if take else mn[g]
    for g in range(G):
        scale_out[g] = _ZERO if flat[g] != 0 else scale[g]
        min_out[g] = -mn[g]
        win_is[g] = _ZERO if flat[g] != 0 else win_is[g]
    for i in range(n):
        for g in range(G):
            L[i, g] = rounded(win_is[g] * (X[i, g] - win_mn[g]), _ZERO, fnmax)


@njit(**_JIT)
def make_qp_quants(n, nmax, x, L, quant_weights, off):
    """ggml ``make_qp_quants`` of ``x[off:off+n]`` (weights from the same
    place): non-negative codes ``0..nmax`` for a super-block's scales or mins.
    ``L`` is ggml's ``uint8_t`` array: a negative code wraps there and is read
    back wrapped, as in ggml."""
    mx = _ZERO
    for i in range(n):
        mx = mx if mx > x[off + i] else x[off + i]
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _ZERO
    fnmax = F32(nmax)
    iscale = fnmax / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[off + i]) & 0xFF
    scale = _ONE / iscale
    best_mse = _ZERO
    for i in range(n):
        diff = x[off + i] - scale * F32(L[i])
        best_mse += quant_weights[off + i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F32(0.1) * F32(step) + fnmax) / mx
        scale_is = _ONE / iscale_is
        mse = _ZERO
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[off + i]))
            diff = x[off + i] - scale_is * F32(l)
            mse += quant_weights[off + i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = _ZERO
    suml2 = _ZERO
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[off + i]))
        L[i] = l & 0xFF
        w = quant_weights[off + i]
        fl = F32(l)
        sumlx += w * x[off + i] * fl
        suml2 += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[off + i]
            li = F32(L[i])
            slx = sumlx - w * x[off + i] * li
            sl2 = suml2 - w * li * li
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[off + i] * sl2 / slx))
                if new_l != L[i]:
                    fl = F32(new_l)
                    slx += w * x[off + i] * fl
                    sl2 += w * fl * fl
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else _ZERO


# ---------------------------------------------------------------- groups in lanes
# The per-block code below indexes y[b, ...] rather than taking row views:
# each view costs numba a reference count.

def as_f32(v):
    """A source value as float32, in compiled code only: float32 itself, or
    BF16 bits (uint16) widened, which is exact (a shift), so a BF16
    checkpoint needs no float32 copy before quantizing."""
    raise NotImplementedError("as_f32 runs inside numba-compiled code only")


@overload(as_f32)
def _as_f32(v):
    if isinstance(v, types.Integer):
        return lambda v: np.uint32(np.uint32(v) << np.uint32(16)).view(np.float32)
    return lambda v: v


@njit(**_JIT)
def to_lanes(x, s0, S, n, X):
    """Blocks ``x[s0:s0+S]`` -> position-major groups of ``n``: column
    ``s*(block/n) + j`` of ``X`` holds group ``j`` of block ``s0 + s``."""
    gpb = x.shape[1] // n
    for s in range(S):
        for j in range(gpb):
            for i in range(n):
                X[i, s * gpb + j] = as_f32(x[s0 + s, n * j + i])


@njit(**_JIT)
def nonfinite(X, G):
    """How many of the lanes' values are Inf or NaN (the check rides on the
    copy in cache instead of a pass over the input)."""
    big = F32(np.finfo(np.float32).max)
    bad = 0
    for i in range(X.shape[0]):
        for g in range(G):
            bad += not (abs(X[i, g]) <= big)
    return bad


@njit(**_JIT)
def sum_squares(x, b):
    """``sum_x2 += x[l]*x[l]`` over block ``b``, in order."""
    s = _ZERO
    for l in range(x.shape[1]):
        v = as_f32(x[b, l])
        s += v * v
    return s


@njit(**_JIT)
def imatrix_lanes(X, G, gpb, qw, b0, sigma2, W, sw):
    """ggml's imatrix weights ``qw[l] * sqrtf(sigma2 + x[l]*x[l])`` of every
    lane (``qw`` the row's importance as (blocks_per_row, block), ``b0`` the
    flat index of the lanes' first block, ``sigma2`` per block of the lanes)
    and their sequential sums ``sw``."""
    n = X.shape[0]
    for g in range(G):
        s = g // gpb
        r = (b0 + s) % qw.shape[0]
        for i in range(n):
            W[i, g] = qw[r, n * (g % gpb) + i] * np.sqrt(sigma2[s] + X[i, g] * X[i, g])
    for g in range(G):
        sw[g] = _ZERO
    for i in range(n):
        for g in range(G):
            sw[g] += W[i, g]


@njit(**_JIT)
def requantize(X, G, dd, dm, lo, hi, offset, L):
    """The K-quants' second pass: codes against the *stored* scales,
    ``MAX(lo, MIN(hi, nearest_int((x + dm)/d))) + offset`` (``x/d`` without a
    min: ``dm`` 0); a group whose ``d`` is 0 keeps its first-pass codes."""
    for i in range(X.shape[0]):
        for g in range(G):
            q = rounded((X[i, g] + dm[g]) / dd[g], lo, hi) + offset
            L[i, g] = L[i, g] if dd[g] == 0 else q


@njit(**_JIT)
def pack_2bit(L, g0, y, b, off):
    """``qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6``
    (``j`` in 0, 128) at ``y[b, off:]`` for the block whose 16 groups start
    at lane ``g0``; only the low 2 bits of each code are kept."""
    for h in range(2):
        for l in range(32):
            q = 0
            for k in range(4):
                q |= (np.int64(L[l % 16, g0 + 8 * h + 2 * k + l // 16]) & 3) << (2 * k)
            y[b, off + 32 * h + l] = q


# ---------------------------------------------------------------- Q4_K: d dmin scales[12] qs[128]
# ---------------------------------------------------------------- Q5_K: d dmin scales[12] qh[32] qs[128]

@njit(**_JIT)
def pack_scale_min_k4(j, ls, lm, y, b):
    """Group ``j``'s 6-bit scale and min codes into the 12 scale bytes at
    ``y[b, 4:16]`` (which start zeroed), with ggml's ``uint8_t`` truncation."""
    if j < 4:
        y[b, 4 + j] = ls & 0xFF
        y[b, 8 + j] = lm & 0xFF
    else:
        y[b, 8 + j] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
        y[b, j] |= ((ls >> 4) << 6) & 0xFF
        y[b, 4 + j] |= ((lm >> 4) << 6) & 0xFF


@njit(**_JIT)
def get_scale_min_k4(j, y, b):
    """ggml ``get_scale_min_k4``: group ``j``'s (scale, min) codes."""
    lo, q, hi = np.int64(y[b, j if j >= 4 else 4 + j]), np.int64(y[b, 4 + j]), np.int64(y[b, 8 + j])
    if j < 4:
        return q & 63, hi & 63
    return (hi & 0xF) | ((lo >> 6) << 4), (hi >> 4) | ((q >> 6) << 4)


@njit(**_JIT)
def ref_codes_k4(scales, mins, g0, y, b):
    """``_ref``: 6-bit codes ``MIN(63, (uint8_t)nearest_int(63/max * v))`` of
    the 8 group scales and mins from lane ``g0``, packed; returns
    ``(max_scale/63, max_min/63)``."""
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(8):
        if scales[g0 + j] > max_scale:
            max_scale = scales[g0 + j]
        if mins[g0 + j] > max_min:
            max_min = mins[g0 + j]
    inv_scale = F32(63.0) / max_scale if max_scale > 0 else _ZERO
    inv_min = F32(63.0) / max_min if max_min > 0 else _ZERO
    for j in range(8):
        ls = min(63, nearest_int(inv_scale * scales[g0 + j]) & 0xFF)
        lm = min(63, nearest_int(inv_min * mins[g0 + j]) & 0xFF)
        pack_scale_min_k4(j, ls, lm, y, b)
    return max_scale / F32(63.0), max_min / F32(63.0)


@njit(**_JIT)
def pack_k4(L, g0, y, b, nmax):
    """Q4_K ``qs[32c + l] = L[64c + l] | L[64c + 32 + l] << 4``; Q5_K the same
    low nibbles after ``qh[32]``, bit 4 of element ``64c + l`` (``64c + 32 +
    l``) in bit ``2c`` (``2c + 1``) of ``qh[l]``."""
    qs = 16 if nmax == 15 else 48
    for l in range(32):
        qh = 0
        for c in range(4):
            l1 = np.int64(L[l, g0 + 2 * c])
            l2 = np.int64(L[l, g0 + 2 * c + 1])
            y[b, qs + 32 * c + l] = (l1 & 0xF) | ((l2 & 0xF) << 4)
            qh |= ((l1 >> 4) << (2 * c)) | ((l2 >> 4) << (2 * c + 1))
        if nmax == 31:
            y[b, 16 + l] = qh


@njit(**_JIT)
def quantize_k4(x, y, qw, b0, nmax, rmin, rdelta, nstep, with_imatrix):
    """``quantize_row_q4_K``/``q5_K``, ``_ref`` or ``_impl``.

    ``_ref``: per 32-group ``av_x = sqrtf(sum(x^2)/32)``, weights ``av_x +
    |x|``, ``make_qkx2_quants(32, nmax, ..., rmin, 0.1f, nstep)``, codes
    ``MIN(63, .)`` against ``max/63``.  ``_impl``: ``sigma2 =
    2*sum(x^2)/256``, imatrix weights, ``make_qkx3_quants(32, nmax, ...,
    -0.9f, 0.05f, 36)``, ``make_qp_quants(8, 63, ...)`` for scales and mins
    (Q5_K clamps those codes to 63, Q4_K does not).  Then d/dmin go to f16
    and every element is requantized against the stored values."""
    X = np.empty((32, LANES), F32)
    W = np.empty((32, LANES), F32)
    L = np.empty((32, LANES), F32)
    Laux = np.empty((32, LANES), F32)
    st = np.empty((6, LANES), F32)
    scales, mins, sw, dd, dm, av_x = st[0], st[1], st[2], st[3], st[4], st[5]
    per = LANES // 8
    sigma2 = np.empty(per, F32)
    Ls = np.empty(8, np.uint8)
    Lm = np.empty(8, np.uint8)
    bad = 0
    for s0 in range(0, x.shape[0], per):
        S = min(x.shape[0] - s0, per)
        G = S * 8
        to_lanes(x, s0, S, 32, X)
        bad += nonfinite(X, G)
        if with_imatrix:
            for s in range(S):
                sigma2[s] = F32(2.0) * sum_squares(x, s0 + s) / F32(QK_K)
            imatrix_lanes(X, G, 8, qw, b0 + s0, sigma2, W, sw)
        else:
            for g in range(G):
                av_x[g] = _ZERO
            for i in range(32):
                for g in range(G):
                    av_x[g] += X[i, g] * X[i, g]
            for g in range(G):
                av_x[g] = np.sqrt(av_x[g] / F32(32.0))
            for i in range(32):
                for g in range(G):
                    W[i, g] = av_x[g] + abs(X[i, g])
        make_qkx2_quants(nmax, X, W, G, rmin, rdelta, nstep, False, L, Laux, scales, mins)
        for s in range(S):
            b = s0 + s
            g0 = 8 * s
            for j in range(4, 16):
                y[b, j] = 0
            if with_imatrix:
                d = make_qp_quants(8, 63, scales, Ls, sw, g0)
                dmin = make_qp_quants(8, 63, mins, Lm, sw, g0)
                for j in range(8):
                    ls, lm = np.int64(Ls[j]), np.int64(Lm[j])
                    if nmax == 31:
                        ls, lm = min(63, ls), min(63, lm)
                    pack_scale_min_k4(j, ls, lm, y, b)
            else:
                d, dmin = ref_codes_k4(scales, mins, g0, y, b)
            d_all = store_fp16(y, b, 0, d)
            dmin_all = store_fp16(y, b, 2, dmin)
            for j in range(8):
                sc, m = get_scale_min_k4(j, y, b)
                dd[g0 + j] = d_all * F32(sc)
                dm[g0 + j] = dmin_all * F32(m)
        requantize(X, G, dd, dm, _ZERO, F32(nmax), _ZERO, L)
        for s in range(S):
            pack_k4(L, 8 * s, y, s0 + s, nmax)
    return bad == 0


def quantize_row_q4_k_ref(x, y):
    """ggml ``quantize_row_q4_K_ref``: ``make_qkx2_quants(32, 15, ..., -1.f, 0.1f, 20)``."""
    return quantize_k4(x, y, _NO_IMATRIX, 0, 15, F32(-1.0), F32(0.1), 20, False)


def quantize_row_q4_k_impl(x, y, qw, b0):
    """ggml ``quantize_row_q4_K_impl``."""
    return quantize_k4(x, y, qw, b0, 15, F32(-0.9), F32(0.05), 36, True)


def quantize_row_q5_k_ref(x, y):
    """ggml ``quantize_row_q5_K_ref``: ``make_qkx2_quants(32, 31, ..., -0.5f, 0.1f, 15)``."""
    return quantize_k4(x, y, _NO_IMATRIX, 0, 31, F32(-0.5), F32(0.1), 15, False)


def quantize_row_q5_k_impl(x, y, qw, b0):
    """ggml ``quantize_row_q5_K_impl``."""
    return quantize_k4(x, y, qw, b0, 31, F32(-0.9), F32(0.05), 36, True)


# ---------------------------------------------------------------- Q2_K: scales[16] qs[64] d dmin

@njit(**_JIT)
def ref_codes_q2_k(scales, mins, g0, y, b):
    """``_ref``: 4-bit scale and min codes against ``max_scale/15`` and
    ``max_min/15`` into the 16 scale bytes ``y[b, 0:16]``; returns ``(d, dmin)``."""
    q4scale = F32(15.0)
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(16):
        if scales[g0 + j] > max_scale:
            max_scale = scales[g0 + j]
        if mins[g0 + j] > max_min:
            max_min = mins[g0 + j]
    d = _ZERO
    dmin = _ZERO
    for j in range(16):
        y[b, j] = 0
    if max_scale > 0:
        iscale = q4scale / max_scale
        for j in range(16):
            y[b, j] = nearest_int(iscale * scales[g0 + j]) & 0xFF
        d = max_scale / q4scale
    if max_min > 0:
        iscale = q4scale / max_min
        for j in range(16):
            y[b, j] |= (nearest_int(iscale * mins[g0 + j]) << 4) & 0xFF
        dmin = max_min / q4scale
    return d, dmin


@njit(**_JIT)
def quantize_q2_k(x, y, qw, b0, with_imatrix):
    """``quantize_row_q2_K_ref``: weights ``|x|``, ``make_qkx2_quants(16, 3,
    ..., -0.5f, 0.1f, 15, true)``; ``_impl``: ``sigma2 = sum(x^2)/256``,
    imatrix weights, ``make_qkx3_quants(16, 3, ..., -0.9f, 0.05f, 36)``,
    ``make_qp_quants(16, 15, ...)`` for the codes.  Then requantize, pack."""
    X = np.empty((16, LANES), F32)
    W = np.empty((16, LANES), F32)
    L = np.empty((16, LANES), F32)
    Laux = np.empty((16, LANES), F32)
    st = np.empty((5, LANES), F32)
    scales, mins, sw, dd, dm = st[0], st[1], st[2], st[3], st[4]
    per = LANES // 16
    sigma2 = np.empty(per, F32)
    Ls = np.empty(16, np.uint8)
    Lm = np.empty(16, np.uint8)
    bad = 0
    for s0 in range(0, x.shape[0], per):
        S = min(x.shape[0] - s0, per)
        G = S * 16
        to_lanes(x, s0, S, 16, X)
        bad += nonfinite(X, G)
        if with_imatrix:
            for s in range(S):
                sigma2[s] = sum_squares(x, s0 + s) / F32(QK_K)
            imatrix_lanes(X, G, 16, qw, b0 + s0, sigma2, W, sw)
            make_qkx2_quants(3, X, W, G, F32(-0.9), F32(0.05), 36, False, L, Laux, scales, mins)
        else:
            for i in range(16):
                for g in range(G):
                    W[i, g] = abs(X[i, g])
            make_qkx2_quants(3, X, W, G, F32(-0.5), F32(0.1), 15, True, L, Laux, scales, mins)
        for s in range(S):
            b = s0 + s
            g0 = 16 * s
            if with_imatrix:
                d = make_qp_quants(16, 15, scales, Ls, sw, g0)
                dmin = make_qp_quants(16, 15, mins, Lm, sw, g0)
                for j in range(16):
                    y[b, j] = (np.int64(Ls[j]) | (np.int64(Lm[j]) << 4)) & 0xFF
            else:
                d, dmin = ref_codes_q2_k(scales, mins, g0, y, b)
            d_all = store_fp16(y, b, 80, d)
            dmin_all = store_fp16(y, b, 82, dmin)
            for j in range(16):
                sc = np.int64(y[b, j])
                dd[g0 + j] = d_all * F32(sc & 0xF)
                dm[g0 + j] = dmin_all * F32(sc >> 4)
        requantize(X, G, dd, dm, _ZERO, F32(3.0), _ZERO, L)
        for s in range(S):
            pack_2bit(L, 16 * s, y, s0 + s, 16)
    return bad == 0


def quantize_row_q2_k_ref(x, y):
    """ggml ``quantize_row_q2_K_ref``."""
    return quantize_q2_k(x, y, _NO_IMATRIX, 0, False)


def quantize_row_q2_k_impl(x, y, qw, b0):
    """ggml ``quantize_row_q2_K_impl``."""
    return quantize_q2_k(x, y, qw, b0, True)


# ---------------------------------------------------------------- Q3_K: hmask[32] qs[64] scales[12] d

@njit(**_JIT)
def pack_scales_q3_k(ls, y, b):
    """The sixteen 6-bit codes ``ls`` (0..63) into the 12 scale bytes at
    ``y[b, 96:108]``."""
    for j in range(12):
        y[b, 96 + j] = 0
    for j in range(16):
        l = np.int64(ls[j])
        if j < 8:
            y[b, 96 + j] = l & 0xF
        else:
            y[b, 96 + j - 8] |= (l & 0xF) << 4
        y[b, 96 + 8 + j % 4] |= ((l >> 4) << (2 * (j // 4))) & 0xFF


@njit(**_JIT)
def scale_q3_k(j, y, b):
    """Group ``j``'s signed scale decoded from the scale bytes."""
    sc = (np.int64(y[b, 96 + j]) & 0xF) if j < 8 else (np.int64(y[b, 96 + j - 8]) >> 4)
    return (sc | (((np.int64(y[b, 104 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


@njit(**_JIT)
def pack_q3_k(L, g0, y, b):
    """Codes 0..7: bit 2 of element ``j`` goes to bit ``j/32`` of
    ``hmask[j%32]``, the low 2 bits to ``qs``."""
    for m in range(32):
        h = 0
        for k in range(8):
            j = 32 * k + m
            if L[j % 16, g0 + j // 16] > 3:
                h |= 1 << k
        y[b, m] = h
    pack_2bit(L, g0, y, b, 32)


@njit(**_JIT)
def ref_codes_q3_k(scales, g0, ls):
    """``_ref``: 6-bit codes of the 16 scales from lane ``g0`` against
    ``max_scale/-32`` (first signed value of largest magnitude); returns
    ``d = 1/iscale``."""
    max_scale = _ZERO
    amax = _ZERO
    for j in range(16):
        a = abs(scales[g0 + j])
        if a > amax:
            amax = a
            max_scale = scales[g0 + j]
    for j in range(16):
        ls[j] = 0
    if max_scale == 0:
        return _ZERO
    iscale = F32(-32.0) / max_scale
    for j in range(16):
        ls[j] = max(-32, min(31, int8_of(nearest_int(iscale * scales[g0 + j])))) + 32
    return _ONE / iscale


@njit(**_JIT)
def quantize_q3_k(x, y, qw, b0, with_imatrix):
    """``quantize_row_q3_K_ref``: ``make_q3_quants(16, 4, ..., true)`` per
    group, codes against ``max_scale/-32``.  ``_impl``: ``sigma2 =
    2*sum(x^2)/256``, imatrix weights, ``make_qx_quants(16, 4, ...)`` per
    group, then ``make_qx_quants(16, 32, scales, Ls, 1, sw)`` for the codes
    (that fit runs one super-block per lane).  Then requantize, pack."""
    X = np.empty((16, LANES), F32)
    W = np.empty((16, LANES), F32)
    L = np.empty((16, LANES), F32)
    st = np.empty((4, LANES), F32)
    scales, sw, dd, no_min = st[0], st[1], st[2], st[3]
    per = LANES // 16
    XS = np.empty((16, per), F32)
    WS = np.empty((16, per), F32)
    LS = np.empty((16, per), F32)
    d_block = np.empty(per, F32)
    sigma2 = np.empty(per, F32)
    ls = np.empty(16, np.int64)
    for g in range(LANES):
        no_min[g] = _ZERO
    bad = 0
    for s0 in range(0, x.shape[0], per):
        S = min(x.shape[0] - s0, per)
        G = S * 16
        to_lanes(x, s0, S, 16, X)
        bad += nonfinite(X, G)
        if with_imatrix:
            for s in range(S):
                sigma2[s] = F32(2.0) * sum_squares(x, s0 + s) / F32(QK_K)
            imatrix_lanes(X, G, 16, qw, b0 + s0, sigma2, W, sw)
            make_qx_quants(4, X, W, G, L, scales)
            for s in range(S):
                for j in range(16):
                    XS[j, s] = scales[16 * s + j]
                    WS[j, s] = sw[16 * s + j]
            make_qx_quants(32, XS, WS, S, LS, d_block)
        else:
            make_q3_quants(4, X, G, L, scales)
        for s in range(S):
            b = s0 + s
            if with_imatrix:
                d = d_block[s]
                for j in range(16):
                    ls[j] = np.int64(LS[j, s])
            else:
                d = ref_codes_q3_k(scales, 16 * s, ls)
            pack_scales_q3_k(ls, y, b)
            d_all = store_fp16(y, b, 108, d)
            for j in range(16):
                dd[16 * s + j] = d_all * F32(scale_q3_k(j, y, b))
        requantize(X, G, dd, no_min, F32(-4.0), F32(3.0), F32(4.0), L)
        for s in range(S):
            pack_q3_k(L, 16 * s, y, s0 + s)
    return bad == 0


def quantize_row_q3_k_ref(x, y):
    """ggml ``quantize_row_q3_K_ref``."""
    return quantize_q3_k(x, y, _NO_IMATRIX, 0, False)


def quantize_row_q3_k_impl(x, y, qw, b0):
    """ggml ``quantize_row_q3_K_impl``."""
    return quantize_q3_k(x, y, qw, b0, True)


# ---------------------------------------------------------------- Q6_K: ql[128] qh[64] scales[16] d

@njit(**_JIT)
def codes_q6_k(scales, g0, y, b):
    """int8 scale codes ``MIN(127, nearest_int(iscale*scale))`` of the 16
    scales from lane ``g0`` against ``d = max_scale/-128`` into ``y[b,
    192:208]``, ``d`` as f16 into ``y[b, 208:210]``; returns ``(stored d,
    whether the super-block is ggml's all-zero one)``: a largest |scale|
    below GROUP_MAX_EPS makes it all zero bytes."""
    max_scale = _ZERO
    max_abs_scale = _ZERO
    for ib in range(16):
        a = abs(scales[g0 + ib])
        if a > max_abs_scale:
            max_abs_scale = a
            max_scale = scales[g0 + ib]
    if max_abs_scale < GROUP_MAX_EPS:
        for j in range(y.shape[1]):
            y[b, j] = 0
        return _ZERO, True
    iscale = F32(-128.0) / max_scale
    for ib in range(16):
        y[b, 192 + ib] = min(127, nearest_int(iscale * scales[g0 + ib])) & 0xFF
    return store_fp16(y, b, 208, _ONE / iscale), False


@njit(**_JIT)
def pack_q6_k(L, g0, y, b):
    """ql[128] qh[64]: for ``j`` in 0, 128, elements ``j + l + 32k`` (k = 0..3)
    share ``ql[j/2 + l]`` (k = 0, 2), ``ql[j/2 + 32 + l]`` (k = 1, 3) and
    ``qh[j/4 + l]`` (2 bits each)."""
    for h in range(2):
        for l in range(32):
            g = g0 + 8 * h + l // 16
            q0, q1 = np.int64(L[l % 16, g]), np.int64(L[l % 16, g + 2])
            q2, q3 = np.int64(L[l % 16, g + 4]), np.int64(L[l % 16, g + 6])
            y[b, 64 * h + l] = (q0 & 0xF) | ((q2 & 0xF) << 4)
            y[b, 64 * h + 32 + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            y[b, 128 + 32 * h + l] = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6)


@njit(**_JIT)
def quantize_q6_k(x, y, qw, b0, with_imatrix):
    """``make_qx_quants(16, 32, x, L, 1, w)`` per group with ``w = x*x``
    (``_ref``, ggml's NULL weights) or the raw importance (``_impl``), int8
    codes of the scales, requantize, pack."""
    X = np.empty((16, LANES), F32)
    W = np.empty((16, LANES), F32)
    L = np.empty((16, LANES), F32)
    st = np.empty((3, LANES), F32)
    scales, dd, no_min = st[0], st[1], st[2]
    per = LANES // 16
    zero_block = np.empty(per, np.bool_)
    for g in range(LANES):
        no_min[g] = _ZERO
    bad = 0
    for s0 in range(0, x.shape[0], per):
        S = min(x.shape[0] - s0, per)
        G = S * 16
        to_lanes(x, s0, S, 16, X)
        bad += nonfinite(X, G)
        if with_imatrix:
            for g in range(G):
                r = (b0 + s0 + g // 16) % qw.shape[0]
                for i in range(16):
                    W[i, g] = qw[r, 16 * (g % 16) + i]
        else:
            for i in range(16):
                for g in range(G):
                    W[i, g] = X[i, g] * X[i, g]
        make_qx_quants(32, X, W, G, L, scales)
        for s in range(S):
            b = s0 + s
            d_all, zero_block[s] = codes_q6_k(scales, 16 * s, y, b)
            for j in range(16):
                dd[16 * s + j] = d_all * F32(int8_of(np.int64(y[b, 192 + j])))
        requantize(X, G, dd, no_min, F32(-32.0), F32(31.0), F32(32.0), L)
        for s in range(S):
            if not zero_block[s]:
                pack_q6_k(L, 16 * s, y, s0 + s)
    return bad == 0


def quantize_row_q6_k_ref(x, y):
    """ggml ``quantize_row_q6_K_ref``: ``make_qx_quants(16, 32, x, L, 1, NULL)``."""
    return quantize_q6_k(x, y, _NO_IMATRIX, 0, False)


def quantize_row_q6_k_impl(x, y, qw, b0):
    """ggml ``quantize_row_q6_K_impl``: ``make_qx_quants(16, 32, x, L, 1, qw)``."""
    return quantize_q6_k(x, y, qw, b0, True)


# ---------------------------------------------------------------- legacy 32-element blocks
# Q8_0: d qs[32]; Q4_0: d qs[16]; Q4_1: d m qs[16]; Q5_0: d qh[4] qs[16]; Q5_1: d m qh[4] qs[16].
# One block per lane.  The per-block code indexes y[b, ...] rather than taking
# row views: each view costs numba a reference count, as much as a block's work.

@njit(**_JIT)
def store_legacy(Q, G, s0, d, mn, nmax, with_min, H, y):
    """Write blocks ``s0 .. s0+G`` from lanes: f16 ``d`` (and ``m``), for
    Q5_0/Q5_1 the little-endian ``uint32_t qh`` (bit ``j`` = bit 4 of code
    ``j``), then ``qs[j] = q[j] & 15 | (q[j+16] & 15) << 4``.

    Every legacy block is a whole number of 16-bit words (18, 20, 22 or 24
    bytes), so the blocks are assembled in lanes (SIMD) as little-endian
    words, word ``k`` of block ``s0+g`` in ``H[k, g]`` (scratch, ``(12,
    >=G)``), and copied out through a uint16 view of ``y``: the copy, a
    transpose that no SIMD loop does, costs one store per word instead of
    one per byte (x86 and ARM are little-endian, like GGUF)."""
    y16 = y.view(np.uint16)
    words = y16.shape[1]
    qs = words - 8                          # qs[16] fills the last 8 words
    for g in range(G):
        H[0, g] = fp32_to_fp16(d[g])
    if with_min:
        for g in range(G):
            H[1, g] = fp32_to_fp16(mn[g])
    if nmax == 16 or nmax == 31:
        for k in range(2):                  # qh's two words: codes 0-15, 16-31
            for g in range(G):
                H[qs - 2 + k, g] = 0
            for i in range(16):
                for g in range(G):
                    H[qs - 2 + k, g] |= ((Q[16 * k + i, g] >> 4) & 1) << i
    for j in range(0, 16, 2):
        for g in range(G):
            lo = (Q[j, g] & 0xF) | ((Q[j + 16, g] & 0xF) << 4)
            hi = (Q[j + 1, g] & 0xF) | ((Q[j + 17, g] & 0xF) << 4)
            H[qs + j // 2, g] = lo | (hi << 8)
    for g in range(G):
        b = s0 + g
        for k in range(words):
            y16[b, k] = H[k, g]


@njit(**_JIT)
def quantize_row_q8_0_ref(x, y):
    """ggml ``quantize_row_q8_0_ref``: ``d = amax/127``, ``qs = roundf(x*id)``
    stored as ``int8_t`` (``id`` infinite for a tiny block gives 0)."""
    X = np.empty((32, LEGACY_LANES), F32)
    Q = np.empty((32, LEGACY_LANES), np.int32)
    st = np.empty((2, LEGACY_LANES), F32)
    d, inv = st[0], st[1]
    h = np.empty(LEGACY_LANES, np.int32)
    bad = 0
    for s0 in range(0, x.shape[0], LEGACY_LANES):
        G = min(x.shape[0] - s0, LEGACY_LANES)
        to_lanes(x, s0, G, 32, X)
        bad += nonfinite(X, G)
        for g in range(G):
            d[g] = _ZERO                               # amax = MAX(amax, fabsf(v))
        for i in range(32):
            for g in range(G):
                a = abs(X[i, g])
                d[g] = d[g] if d[g] > a else a
        for g in range(G):
            d[g] = d[g] / F32(127.0)
            inv[g] = _ONE / d[g] if d[g] != 0 else _ZERO
        for i in range(32):
            for g in range(G):
                Q[i, g] = cvtt(roundf(X[i, g] * inv[g])) & 0xFF
        for g in range(G):
            h[g] = fp32_to_fp16(d[g])
        for g in range(G):
            y[s0 + g, 0] = h[g] & 0xFF
            y[s0 + g, 1] = h[g] >> 8
            for j in range(32):
                y[s0 + g, 2 + j] = Q[j, g]
    return bad == 0


@njit(**_JIT)
def legacy_extremes(X, G, with_min, lo, hi, nonfin):
    """Per lane what ggml's legacy ``_ref`` quantizers derive ``d`` from: for
    Q4_1/Q5_1 the block's ``min`` and ``max`` into ``lo``/``hi`` (``if (v <
    min) min = v`` from ``FLT_MAX``, ``max`` alike from ``-FLT_MAX``); for
    Q4_0/Q5_0 :func:`first_abs_max`'s ``amax`` and ``max``.  ``nonfin`` gets
    0, or a NaN/Inf of the lane: the check rides on this pass instead of
    making one of its own (:func:`nonfinite`, about 6% of Q4_0's time)."""
    big = F32(np.finfo(np.float32).max)
    for g in range(G):
        lo[g] = big if with_min else _ZERO
        hi[g] = -big if with_min else _ZERO
        nonfin[g] = _ZERO
    for i in range(X.shape[0]):
        for g in range(G):
            v = X[i, g]
            a = abs(v)
            nonfin[g] = nonfin[g] if a <= big else v
            if with_min:
                lo[g] = v if v < lo[g] else lo[g]
                hi[g] = v if v > hi[g] else hi[g]
            else:
                hi[g] = v if a > lo[g] else hi[g]
                lo[g] = max(lo[g], a)


@njit(**_JIT)
def legacy_code(v, inv, bias, top):
    """``MIN(top, (int8_t)(v*id + bias))`` as a byte: Q5_1's ``(uint8_t)(v*id +
    0.5f)`` is the same byte with ``top`` 255."""
    return min(top, int8_of(cvtt(v * inv + bias))) & 0xFF


@njit(**_JIT)
def quantize_legacy_ref(x, y, nmax, with_min):
    """``quantize_row_q4_0_ref``/``q5_0_ref`` (``with_min`` False): ``max`` the
    first value of largest |x|, ``d = max / -nmax``, ``q = MIN(2*nmax-1,
    (int8_t)(x*id + nmax + 0.5f))``; ``quantize_row_q4_1_ref``/``q5_1_ref``:
    ``d = (max - min)/nmax``, ``q = (int8_t)((x - min)*id + 0.5f)``, Q4_1
    with ``MIN(15, .)``, Q5_1 as ``uint8_t`` without; :func:`legacy_code`
    serves all four, the offset ``min`` being 0 for Q4_0/Q5_0."""
    X = np.empty((32, LEGACY_LANES), F32)
    Q = np.empty((32, LEGACY_LANES), np.int32)
    st = np.empty((5, LEGACY_LANES), F32)
    lo, hi, d, inv, nonfin = st[0], st[1], st[2], st[3], st[4]
    H = np.empty((12, LEGACY_LANES), np.int32)
    bias = F32(0.5) if with_min else F32(nmax) + F32(0.5)
    top = np.int32(2 * nmax - 1 if not with_min else 15 if nmax == 15 else 255)
    bad = 0
    for s0 in range(0, x.shape[0], LEGACY_LANES):
        G = min(x.shape[0] - s0, LEGACY_LANES)
        to_lanes(x, s0, G, 32, X)
        legacy_extremes(X, G, with_min, lo, hi, nonfin)
        for g in range(G):
            bad += nonfin[g] != 0
            d[g] = (hi[g] - lo[g]) / F32(nmax) if with_min else hi[g] / F32(-nmax)
            inv[g] = _ONE / d[g] if d[g] != 0 else _ZERO
            lo[g] = lo[g] if with_min else _ZERO        # x - 0 is x, -0 included
        for i in range(32):
            for g in range(G):
                Q[i, g] = legacy_code(X[i, g] - lo[g], inv[g], bias, top)
        store_legacy(Q, G, s0, d, lo, nmax, with_min, H, y)
    return bad == 0


def quantize_row_q4_0_ref(x, y):
    """ggml ``quantize_row_q4_0_ref``."""
    return quantize_legacy_ref(x, y, 8, False)


def quantize_row_q4_1_ref(x, y):
    """ggml ``quantize_row_q4_1_ref``."""
    return quantize_legacy_ref(x, y, 15, True)


def quantize_row_q5_0_ref(x, y):
    """ggml ``quantize_row_q5_0_ref``."""
    return quantize_legacy_ref(x, y, 16, False)


def quantize_row_q5_1_ref(x, y):
    """ggml ``quantize_row_q5_1_ref``."""
    return quantize_legacy_ref(x, y, 31, True)


@njit(**_JIT)
def quantize_legacy_impl(x, y, qw, b0, sigma2, nmax, with_min):
    """``quantize_row_q4_0_impl`` ... ``q5_1_impl``: weights ``qw[j] *
    sqrtf(sigma2 + x[j]*x[j])`` with the row's ``sigma2``, then per block
    ``make_qx_quants(32, nmax, x, L, 1, weight)`` (Q4_0/Q5_0) or
    ``make_qkx3_quants(32, nmax, ..., -0.9f, 0.05f, 36)`` with ``m = -min``
    (Q4_1/Q5_1); one block per lane."""
    X = np.empty((32, LEGACY_LANES), F32)
    W = np.empty((32, LEGACY_LANES), F32)
    L = np.empty((32, LEGACY_LANES), F32)
    Laux = np.empty((32, LEGACY_LANES), F32)
    st = np.empty((3, LEGACY_LANES), F32)
    scales, mins, sw = st[0], st[1], st[2]
    sig = np.empty(LEGACY_LANES, F32)
    Q = np.empty((32, LEGACY_LANES), np.int32)
    H = np.empty((12, LEGACY_LANES), np.int32)
    bpr = qw.shape[0]
    bad = 0
    for s0 in range(0, x.shape[0], LEGACY_LANES):
        G = min(x.shape[0] - s0, LEGACY_LANES)
        to_lanes(x, s0, G, 32, X)
        bad += nonfinite(X, G)
        for g in range(G):
            sig[g] = sigma2[(b0 + s0 + g) // bpr]
        imatrix_lanes(X, G, 1, qw, b0 + s0, sig, W, sw)
        if with_min:
            make_qkx2_quants(nmax, X, W, G, F32(-0.9), F32(0.05), 36, False, L, Laux, scales, mins)
        else:
            make_qx_quants(nmax, X, W, G, L, scales)
        for i in range(32):
            for g in range(G):
                Q[i, g] = np.int32(L[i, g])
        for g in range(G):
            mins[g] = -mins[g]                         # m = -the_min
        store_legacy(Q, G, s0, scales, mins, nmax, with_min, H, y)
    return bad == 0


def quantize_row_q4_0_impl(x, y, qw, b0, sigma2):
    """ggml ``quantize_row_q4_0_impl``: ``make_qx_quants(32, 8, ...)``."""
    return quantize_legacy_impl(x, y, qw, b0, sigma2, 8, False)


def quantize_row_q4_1_impl(x, y, qw, b0, sigma2):
    """ggml ``quantize_row_q4_1_impl``: ``make_qkx3_quants(32, 15, ...)``."""
    return quantize_legacy_impl(x, y, qw, b0, sigma2, 15, True)


def quantize_row_q5_0_impl(x, y, qw, b0, sigma2):
    """ggml ``quantize_row_q5_0_impl``: ``make_qx_quants(32, 16, ...)``."""
    return quantize_legacy_impl(x, y, qw, b0, sigma2, 16, False)


def quantize_row_q5_1_impl(x, y, qw, b0, sigma2):
    """ggml ``quantize_row_q5_1_impl``: ``make_qkx3_quants(32, 31, ...)``."""
    return quantize_legacy_impl(x, y, qw, b0, sigma2, 31, True)


# ---------------------------------------------------------------- entry points

# (ref, impl) by GGML type name; Q8_0 has no imatrix path (ggml ignores it).
KERNELS = {
    "Q8_0": (quantize_row_q8_0_ref, None),
    "Q4_0": (quantize_row_q4_0_ref, quantize_row_q4_0_impl),
    "Q4_1": (quantize_row_q4_1_ref, quantize_row_q4_1_impl),
    "Q5_0": (quantize_row_q5_0_ref, quantize_row_q5_0_impl),
    "Q5_1": (quantize_row_q5_1_ref, quantize_row_q5_1_impl),
    "Q2_K": (quantize_row_q2_k_ref, quantize_row_q2_k_impl),
    "Q3_K": (quantize_row_q3_k_ref, quantize_row_q3_k_impl),
    "Q4_K": (quantize_row_q4_k_ref, quantize_row_q4_k_impl),
    "Q5_K": (quantize_row_q5_k_ref, quantize_row_q5_k_impl),
    "Q6_K": (quantize_row_q6_k_ref, quantize_row_q6_k_impl),
}
