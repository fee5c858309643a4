"""ggml's IQ4_NL and IQ4_XS compiled with numba; see ``_cpu`` for the exactness rules, ``_iquants`` for
the format.

Both run ggml's ``quantize_row_iq4_nl_impl`` over 32-element groups, one group per SIMD lane: fit a
scale per group over fifteen trial scales (``ntry`` 7), then either store it as the block's f16 scale
(IQ4_NL, blocks of 32) or as a 6-bit code against one f16 super-block scale (IQ4_XS, 256), and pick every
element's nearest codebook entry against the stored scale.
"""

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
    ZERO,
    first_abs_max,
    imatrix_lanes,
    nearest_int,
    nonfinite,
    store_fp16,
    sum_squares,
    to_lanes,
)

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], F32)
NTRY = 7


@njit(**JIT)
def best_index(values, x):
    """ggml ``best_index_int8(16, values, x)``: the nearest entry, the upper one on a tie, computed as ggml's
    binary search ends (``val[ml] <= x < val[ml+1]``, then ``x - val[ml] < val[ml+1] - x``) but without
    branches: ``!(x < v)`` steps up, so NaN ends at 15 as it does in ggml."""
    ml = 0
    for step in (8, 4, 2, 1):
        ml = ml + step if not (x < values[ml + step]) else ml
    ml = min(ml, 14)
    return ml if x - values[ml] < values[ml + 1] - x else ml + 1


@njit(**JIT)
def fit_scales(X, W, G, values, mx, amax, scales, sumqx, sumq2, best, idv):
    """Per lane ggml's trial fit: the least-squares scale at ``-max/values[0]`` (0 where the weights are all
    0: an imatrix's unused columns), then at ``(itry +
    values[0])/max`` for ``itry`` in -7..7, the best kept (``sumqx²/sumq2`` largest); 0 for a group whose
    largest |x| is below GROUP_MAX_EPS."""
    first_abs_max(X, G, amax, mx)
    for g in range(G):
        d = -mx[g] / values[0]
        idv[g] = ONE / d
        sumqx[g] = ZERO
        sumq2[g] = ZERO
    for i in range(X.shape[0]):
        for g in range(G):
            q = values[best_index(values, idv[g] * X[i, g])]
            wq = W[i, g] * q
            sumqx[g] += wq * X[i, g]
            sumq2[g] += wq * q
    for g in range(G):
        scales[g] = sumqx[g] / sumq2[g] if sumq2[g] > 0 else ZERO     # 0 where every weight is 0
        best[g] = scales[g] * sumqx[g]
    for itry in range(-NTRY, NTRY + 1):
        for g in range(G):
            idv[g] = F32(itry + int(values[0])) / mx[g]
            sumqx[g] = ZERO
            sumq2[g] = ZERO
        for i in range(X.shape[0]):
            for g in range(G):
                q = values[best_index(values, idv[g] * X[i, g])]
                wq = W[i, g] * q
                sumqx[g] += wq * X[i, g]
                sumq2[g] += wq * q
        for g in range(G):
            if sumq2[g] > 0 and sumqx[g] * sumqx[g] > best[g] * sumq2[g]:
                scales[g] = sumqx[g] / sumq2[g]
                best[g] = scales[g] * sumqx[g]
    for g in range(G):
        scales[g] = ZERO if amax[g] < GROUP_MAX_EPS else scales[g]


@njit(**JIT)
def pack_codes(X, g, inverse, values, y, b, off):
    """Group ``g``'s codes against ``inverse`` (the stored scale's reciprocal) as nibbles at ``y[b, off:off
    + 16]``: ``qs[j] = L[j] | L[j + 16] << 4``."""
    for j in range(16):
        lo = best_index(values, inverse * X[j, g])
        hi = best_index(values, inverse * X[j + 16, g])
        y[b, off + j] = lo | (hi << 4)


@njit(**JIT)
def quantize_iq4(x, y, qw, b0, with_imatrix, super_groups):
    """IQ4_NL (``super_groups`` 1: d qs[16]) or IQ4_XS (8: d scales_h scales_l[4] qs[128]) of the blocks
    in ``x``; the imatrix weights are ``qw * sqrtf(sigma2 + x²)`` with sigma2 twice the block's mean
    square, else ``x²``."""
    n = 32
    values = KVALUES
    X = np.empty((n, LANES), F32)
    W = np.empty((n, LANES), F32)
    st = np.empty((8, LANES), F32)
    mx, amax, scales, sumqx, sumq2, best, idv, sw = st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7]
    per = LANES // super_groups
    sigma2 = np.empty(per, F32)
    bad = 0
    for s0 in range(0, x.shape[0], per):
        S = min(x.shape[0] - s0, per)
        G = S * super_groups
        to_lanes(x, s0, S, n, X)
        bad += nonfinite(X, G)
        if with_imatrix:
            for s in range(S):
                sigma2[s] = sum_squares(x, s0 + s) * F32(2.0 / (n * super_groups))
            imatrix_lanes(X, G, super_groups, qw, b0 + s0, sigma2, W, sw)
        else:
            for i in range(n):
                for g in range(G):
                    W[i, g] = X[i, g] * X[i, g]
        fit_scales(X, W, G, values, mx, amax, scales, sumqx, sumq2, best, idv)
        for s in range(S):
            b = s0 + s
            if super_groups == 1:
                d = scales[s]
                store_fp16(y, b, 0, d)
                pack_codes(X, s, ONE / d if d else ZERO, values, y, b, 2)
                continue
            _pack_xs(X, s * super_groups, scales, values, y, b)
    return bad == 0


@njit(**JIT)
def _pack_xs(X, g0, scales, values, y, b):
    """One IQ4_XS super-block from the 8 groups at lane ``g0``: ``d = -max_scale/32`` as f16, each group's
    6-bit code ``nearest_int(scale/d)`` clamped to -32..31 and stored +32 (low nibbles in ``scales_l``,
    high 2 bits in ``scales_h``), and the codes against ``d * l``."""
    max_scale = ZERO
    amax_scale = ZERO
    for ib in range(8):
        a = abs(scales[g0 + ib])
        if a > amax_scale:
            amax_scale = a
            max_scale = scales[g0 + ib]
    d = -max_scale / F32(32.0)
    store_fp16(y, b, 0, d)
    inverse = ONE / d if d else ZERO
    high = 0
    for ib in range(8):
        l = min(max(nearest_int(inverse * scales[g0 + ib]), -32), 31)
        dl = d * F32(l)
        pack_codes(X, g0 + ib, ONE / dl if dl else ZERO, values, y, b, 8 + 16 * ib)
        l += 32
        if ib % 2 == 0:
            y[b, 4 + ib // 2] = l & 0xF
        else:
            y[b, 4 + ib // 2] |= (l & 0xF) << 4
        high |= (l >> 4) << (2 * ib)
    y[b, 2] = high & 0xFF
    y[b, 3] = high >> 8


def quantize_row_iq4_nl_ref(x, y):
    """ggml ``quantize_iq4_nl`` without an importance matrix (what ``quantize_row_iq4_nl_ref`` calls)."""
    return quantize_iq4(x, y, NO_IMATRIX, 0, False, 1)


def quantize_row_iq4_nl_impl(x, y, qw, b0):
    """ggml ``quantize_iq4_nl`` with one."""
    return quantize_iq4(x, y, qw, b0, True, 1)


def quantize_row_iq4_xs_ref(x, y):
    """ggml ``quantize_iq4_xs`` without an importance matrix."""
    return quantize_iq4(x, y, NO_IMATRIX, 0, False, 8)


def quantize_row_iq4_xs_impl(x, y, qw, b0):
    """ggml ``quantize_iq4_xs`` with one."""
    return quantize_iq4(x, y, qw, b0, True, 8)
