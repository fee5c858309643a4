"""The numba kernels' shared parts: float32 scalar helpers as ggml spells them, ggml's scale-fitting
routines over groups in SIMD lanes, and the lane plumbing.  Exactness rules: ``_cpu``'s docstring."""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

F32 = np.float32
JIT = dict(cache=True, nogil=True, error_model="numpy")

ZERO = F32(0.0)
ONE = F32(1.0)
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
NO_IMATRIX = np.zeros((1, QK_K), F32)        # the qw argument of the _ref paths


# ---------------------------------------------------------------- scalar helpers

@njit(**JIT)
def nearest_int(fval):
    """ggml ``nearest_int``: add 1.5*2^23 (the float32 add rounds half to
    even) and read the integer off the mantissa bits, bit for bit, including
    the values ggml returns outside ``|fval| <= 4194303``."""
    val = fval + _MAGIC
    return np.int32((F32(val).view(np.int32) & 0x007FFFFF) - 0x00400000)


@njit(**JIT)
def rounded(v, lo, hi):
    """``MAX(lo, MIN(hi, nearest_int(v)))`` as float32 (the codes are small
    integers, exact in float32; float lanes keep the group loops in SIMD)."""
    return min(max(F32(nearest_int(v)), lo), hi)


@njit(**JIT)
def cvtt(v):
    """C's float -> int conversion as x86 ``cvttss2si`` does it: truncation,
    and 0x80000000 for NaN or out-of-range values (ggml's legacy quantizers
    cast ``x*id + 8.5f`` and friends, with ``id`` infinite for tiny blocks).
    A select on an int32, so loops of it stay in 8-lane SIMD (an early
    return, or an int64 result, halves the lanes of the legacy code loops)."""
    return np.int32(v) if abs(v) < F32(2147483648.0) else np.int32(-2147483648)


@njit(**JIT)
def int8_of(i):
    """Store of an int into ``int8_t`` (wraps modulo 256), as int32: numba
    widens int32 arithmetic to int64, a cast keeps the lanes 32-bit."""
    return np.int32(np.int8(i))


@njit(**JIT)
def roundf(v):
    """C ``roundf`` (half away from zero) of a float32, exactly: ``v - trunc(v)``
    is exact, and so is adding 1 to an integer below 2^23 (larger floats are
    integers already)."""
    t = np.trunc(v)
    if abs(v - t) >= F32(0.5):
        return t + (ONE if v > 0 else -ONE)
    return t


@njit(**JIT)
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


@njit(**JIT)
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


@njit(**JIT)
def store_fp16(y, b, off, f):
    """``y[b, off:off+2] = GGML_FP32_TO_FP16(f)`` little-endian; returns the
    stored value as float32 (``GGML_FP16_TO_FP32`` of it)."""
    h = fp32_to_fp16(f)
    y[b, off] = h & 0xFF
    y[b, off + 1] = h >> 8
    return fp16_to_fp32(h)


# ---------------------------------------------------------------- scale fitting

@njit(**JIT)
def largest_scale(scales, g0, n):
    """ggml's running ``if (fabsf(s) > amax) { amax = fabsf(s); max = s; }`` from ``amax = max = 0`` over
    ``scales[g0:g0+n]``: ``(the first signed value of largest magnitude, that magnitude)``."""
    signed = ZERO
    amax = ZERO
    for j in range(n):
        a = abs(scales[g0 + j])
        if a > amax:
            amax = a
            signed = scales[g0 + j]
    return signed, amax


@njit(**JIT)
def first_abs_max(X, G, amax, mx):
    """Per group ggml's ``if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max =
    x[i]; }`` from ``amax = max = 0``: the largest |x| and the first value
    reaching it.  Written as two selects on the old ``amax``, the form LLVM
    turns into SIMD (a shared ``take`` flag is not, 9x slower)."""
    for g in range(G):
        amax[g] = ZERO
        mx[g] = ZERO
    for i in range(X.shape[0]):
        for g in range(G):
            a = abs(X[i, g])
            mx[g] = X[i, g] if a > amax[g] else mx[g]
            amax[g] = max(amax[g], a)


@njit(**JIT)
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
            sumlx[g] = ZERO
            suml2[g] = ZERO
        for i in range(n):
            for g in range(G):
                l = rounded(iscale[g] * X[i, g], F32(-nmax), fnmax - ONE)
                sumlx[g] += W[i, g] * X[i, g] * l
                suml2[g] += W[i, g] * l * l
        if k == 0:
            for g in range(G):
                scale[g] = sumlx[g] / suml2[g] if suml2[g] != 0 else ZERO
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
        scale_out[g] = ZERO if zero else scale[g]
        best_is[g] = ZERO if zero else best_is[g]
        offset[g] = ZERO if zero else fnmax
    for i in range(n):
        for g in range(G):
            L[i, g] = rounded(best_is[g] * X[i, g], F32(-nmax), fnmax - ONE) + offset[g]


@njit(**JIT)
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
    lo, hi = F32(-nmax), fnmax - ONE
    st = np.empty((5, G), F32)
    amax, mx, iscale, sumlx, suml2 = st[0], st[1], st[2], st[3], st[4]
    first_abs_max(X, G, amax, mx)
    for g in range(G):
        iscale[g] = F32(-nmax) / mx[g]
        sumlx[g] = ZERO
        suml2[g] = ZERO
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
        scale_out[g] = ZERO if zero or not suml2[g] > 0 else sumlx[g] / suml2[g]
        iscale[g] = ZERO if zero else ONE      # (reused: 1 where the codes get + nmax)
    for i in range(n):
        for g in range(G):
            L[i, g] = (L[i, g] + fnmax) * iscale[g]


@njit(**JIT)
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
        mn[g] = ZERO if mn[g] > 0 else mn[g]
        iscale[g] = fnmax / (mx[g] - mn[g])
        scale[g] = ONE / iscale[g]
        best[g] = ZERO
        win_is[g] = iscale[g]
        win_mn[g] = mn[g]
        flat[g] = ONE if mx[g] == mn[g] else ZERO   # ggml's early exit: scale 0, codes 0
    for i in range(n):
        for g in range(G):
            l = rounded(iscale[g] * (X[i, g] - mn[g]), ZERO, fnmax)
            diff = scale[g] * l + mn[g] - X[i, g]
            diff = abs(diff) if use_mad else diff * diff
            best[g] += W[i, g] * diff
    for step in range(nstep + 1):
        num = rmin + rdelta * F32(step) + fnmax
        for g in range(G):
            iscale[g] = num / (mx[g] - mn[g])
            sl[g] = ZERO
            sl2[g] = ZERO
            sxl[g] = ZERO
        for i in range(n):
            for g in range(G):
                l = rounded(iscale[g] * (X[i, g] - mn[g]), ZERO, fnmax)
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
            tm[g] = ZERO if clip else this_min
            err[g] = ZERO
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
        scale_out[g] = ZERO if flat[g] != 0 else scale[g]
        min_out[g] = -mn[g]
        win_is[g] = ZERO if flat[g] != 0 else win_is[g]
    for i in range(n):
        for g in range(G):
            L[i, g] = rounded(win_is[g] * (X[i, g] - win_mn[g]), ZERO, fnmax)


@njit(**JIT)
def make_qp_quants(n, nmax, x, L, quant_weights, off):
    """ggml ``make_qp_quants`` of ``x[off:off+n]`` (weights from the same
    place): non-negative codes ``0..nmax`` for a super-block's scales or mins.
    ``L`` is ggml's ``uint8_t`` array: a negative code wraps there and is read
    back wrapped, as in ggml."""
    mx = ZERO
    for i in range(n):
        mx = mx if mx > x[off + i] else x[off + i]
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return ZERO
    fnmax = F32(nmax)
    iscale = fnmax / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[off + i]) & 0xFF
    scale = ONE / iscale
    best_mse = ZERO
    for i in range(n):
        diff = x[off + i] - scale * F32(L[i])
        best_mse += quant_weights[off + i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F32(0.1) * F32(step) + fnmax) / mx
        scale_is = ONE / iscale_is
        mse = ZERO
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[off + i]))
            diff = x[off + i] - scale_is * F32(l)
            mse += quant_weights[off + i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = ZERO
    suml2 = ZERO
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
    return sumlx / suml2 if suml2 > 0 else ZERO


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


@njit(**JIT)
def to_lanes(x, s0, S, n, X):
    """Blocks ``x[s0:s0+S]`` -> position-major groups of ``n``: column
    ``s*(block/n) + j`` of ``X`` holds group ``j`` of block ``s0 + s``."""
    gpb = x.shape[1] // n
    for s in range(S):
        for j in range(gpb):
            for i in range(n):
                X[i, s * gpb + j] = as_f32(x[s0 + s, n * j + i])


@njit(**JIT)
def nonfinite(X, G):
    """How many of the lanes' values are Inf or NaN (the check rides on the
    copy in cache instead of a pass over the input)."""
    big = F32(np.finfo(np.float32).max)
    bad = 0
    for i in range(X.shape[0]):
        for g in range(G):
            bad += not (abs(X[i, g]) <= big)
    return bad


@njit(**JIT)
def sum_squares(x, b):
    """``sum_x2 += x[l]*x[l]`` over block ``b``, in order."""
    s = ZERO
    for l in range(x.shape[1]):
        v = as_f32(x[b, l])
        s += v * v
    return s


@njit(**JIT)
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
        sw[g] = ZERO
    for i in range(n):
        for g in range(G):
            sw[g] += W[i, g]


@njit(**JIT)
def requantize(X, G, dd, dm, lo, hi, offset, L):
    """The K-quants' second pass: codes against the *stored* scales,
    ``MAX(lo, MIN(hi, nearest_int((x + dm)/d))) + offset`` (``x/d`` without a
    min: ``dm`` 0); a group whose ``d`` is 0 keeps its first-pass codes."""
    for i in range(X.shape[0]):
        for g in range(G):
            q = rounded((X[i, g] + dm[g]) / dd[g], lo, hi) + offset
            L[i, g] = L[i, g] if dd[g] == 0 else q


@njit(**JIT)
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
