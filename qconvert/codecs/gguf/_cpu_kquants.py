"""ggml's K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) compiled with numba; see ``_cpu``."""

from __future__ import annotations

import numpy as np
from numba import njit

from qconvert.codecs.gguf._cpu_core import (
    F32,
    GROUP_MAX_EPS,
    JIT,
    LANES,
    NO_IMATRIX,
    ONE,
    QK_K,
    ZERO,
    imatrix_lanes,
    int8_of,
    largest_scale,
    make_q3_quants,
    make_qkx2_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    nonfinite,
    pack_2bit,
    requantize,
    store_fp16,
    sum_squares,
    to_lanes,
)

# ---------------------------------------------------------------- Q4_K: d dmin scales[12] qs[128]
# ---------------------------------------------------------------- Q5_K: d dmin scales[12] qh[32] qs[128]

@njit(**JIT)
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


@njit(**JIT)
def get_scale_min_k4(j, y, b):
    """ggml ``get_scale_min_k4``: group ``j``'s (scale, min) codes."""
    lo, q, hi = np.int64(y[b, j if j >= 4 else 4 + j]), np.int64(y[b, 4 + j]), np.int64(y[b, 8 + j])
    if j < 4:
        return q & 63, hi & 63
    return (hi & 0xF) | ((lo >> 6) << 4), (hi >> 4) | ((q >> 6) << 4)


@njit(**JIT)
def ref_codes_k4(scales, mins, g0, y, b):
    """``_ref``: 6-bit codes ``MIN(63, (uint8_t)nearest_int(63/max * v))`` of
    the 8 group scales and mins from lane ``g0``, packed; returns
    ``(max_scale/63, max_min/63)``."""
    max_scale = ZERO
    max_min = ZERO
    for j in range(8):
        if scales[g0 + j] > max_scale:
            max_scale = scales[g0 + j]
        if mins[g0 + j] > max_min:
            max_min = mins[g0 + j]
    inv_scale = F32(63.0) / max_scale if max_scale > 0 else ZERO
    inv_min = F32(63.0) / max_min if max_min > 0 else ZERO
    for j in range(8):
        ls = min(63, nearest_int(inv_scale * scales[g0 + j]) & 0xFF)
        lm = min(63, nearest_int(inv_min * mins[g0 + j]) & 0xFF)
        pack_scale_min_k4(j, ls, lm, y, b)
    return max_scale / F32(63.0), max_min / F32(63.0)


@njit(**JIT)
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


@njit(**JIT)
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
                av_x[g] = ZERO
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
        requantize(X, G, dd, dm, ZERO, F32(nmax), ZERO, L)
        for s in range(S):
            pack_k4(L, 8 * s, y, s0 + s, nmax)
    return bad == 0


def quantize_row_q4_k_ref(x, y):
    """ggml ``quantize_row_q4_K_ref``: ``make_qkx2_quants(32, 15, ..., -1.f, 0.1f, 20)``."""
    return quantize_k4(x, y, NO_IMATRIX, 0, 15, F32(-1.0), F32(0.1), 20, False)


def quantize_row_q4_k_impl(x, y, qw, b0):
    """ggml ``quantize_row_q4_K_impl``."""
    return quantize_k4(x, y, qw, b0, 15, F32(-0.9), F32(0.05), 36, True)


def quantize_row_q5_k_ref(x, y):
    """ggml ``quantize_row_q5_K_ref``: ``make_qkx2_quants(32, 31, ..., -0.5f, 0.1f, 15)``."""
    return quantize_k4(x, y, NO_IMATRIX, 0, 31, F32(-0.5), F32(0.1), 15, False)


def quantize_row_q5_k_impl(x, y, qw, b0):
    """ggml ``quantize_row_q5_K_impl``."""
    return quantize_k4(x, y, qw, b0, 31, F32(-0.9), F32(0.05), 36, True)


# ---------------------------------------------------------------- Q2_K: scales[16] qs[64] d dmin

@njit(**JIT)
def ref_codes_q2_k(scales, mins, g0, y, b):
    """``_ref``: 4-bit scale and min codes against ``max_scale/15`` and
    ``max_min/15`` into the 16 scale bytes ``y[b, 0:16]``; returns ``(d, dmin)``."""
    q4scale = F32(15.0)
    max_scale = ZERO
    max_min = ZERO
    for j in range(16):
        if scales[g0 + j] > max_scale:
            max_scale = scales[g0 + j]
        if mins[g0 + j] > max_min:
            max_min = mins[g0 + j]
    d = ZERO
    dmin = ZERO
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


@njit(**JIT)
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
        requantize(X, G, dd, dm, ZERO, F32(3.0), ZERO, L)
        for s in range(S):
            pack_2bit(L, 16 * s, y, s0 + s, 16)
    return bad == 0


def quantize_row_q2_k_ref(x, y):
    """ggml ``quantize_row_q2_K_ref``."""
    return quantize_q2_k(x, y, NO_IMATRIX, 0, False)


def quantize_row_q2_k_impl(x, y, qw, b0):
    """ggml ``quantize_row_q2_K_impl``."""
    return quantize_q2_k(x, y, qw, b0, True)


# ---------------------------------------------------------------- Q3_K: hmask[32] qs[64] scales[12] d

@njit(**JIT)
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


@njit(**JIT)
def scale_q3_k(j, y, b):
    """Group ``j``'s signed scale decoded from the scale bytes."""
    sc = (np.int64(y[b, 96 + j]) & 0xF) if j < 8 else (np.int64(y[b, 96 + j - 8]) >> 4)
    return (sc | (((np.int64(y[b, 104 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


@njit(**JIT)
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


@njit(**JIT)
def ref_codes_q3_k(scales, g0, ls):
    """``_ref``: 6-bit codes of the 16 scales from lane ``g0`` against
    ``max_scale/-32`` (first signed value of largest magnitude); returns
    ``d = 1/iscale``."""
    max_scale = largest_scale(scales, g0, 16)[0]
    for j in range(16):
        ls[j] = 0
    if max_scale == 0:
        return ZERO
    iscale = F32(-32.0) / max_scale
    for j in range(16):
        ls[j] = max(-32, min(31, int8_of(nearest_int(iscale * scales[g0 + j])))) + 32
    return ONE / iscale


@njit(**JIT)
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
        no_min[g] = ZERO
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
    return quantize_q3_k(x, y, NO_IMATRIX, 0, False)


def quantize_row_q3_k_impl(x, y, qw, b0):
    """ggml ``quantize_row_q3_K_impl``."""
    return quantize_q3_k(x, y, qw, b0, True)


# ---------------------------------------------------------------- Q6_K: ql[128] qh[64] scales[16] d

@njit(**JIT)
def codes_q6_k(scales, g0, y, b):
    """int8 scale codes ``MIN(127, nearest_int(iscale*scale))`` of the 16
    scales from lane ``g0`` against ``d = max_scale/-128`` into ``y[b,
    192:208]``, ``d`` as f16 into ``y[b, 208:210]``; returns ``(stored d,
    whether the super-block is ggml's all-zero one)``: a largest |scale|
    below GROUP_MAX_EPS makes it all zero bytes."""
    max_scale, max_abs_scale = largest_scale(scales, g0, 16)
    if max_abs_scale < GROUP_MAX_EPS:
        for j in range(y.shape[1]):
            y[b, j] = 0
        return ZERO, True
    iscale = F32(-128.0) / max_scale
    for ib in range(16):
        y[b, 192 + ib] = min(127, nearest_int(iscale * scales[g0 + ib])) & 0xFF
    return store_fp16(y, b, 208, ONE / iscale), False


@njit(**JIT)
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


@njit(**JIT)
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
        no_min[g] = ZERO
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
    return quantize_q6_k(x, y, NO_IMATRIX, 0, False)


def quantize_row_q6_k_impl(x, y, qw, b0):
    """ggml ``quantize_row_q6_K_impl``: ``make_qx_quants(16, 32, x, L, 1, qw)``."""
    return quantize_q6_k(x, y, qw, b0, True)
