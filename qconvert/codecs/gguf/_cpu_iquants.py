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
    largest_scale,
    nearest_int,
    nonfinite,
    store_fp16,
    sum_squares,
    to_lanes,
)

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], F32)
NTRY = 7


def _thresholds(values: np.ndarray) -> np.ndarray:
    """For each neighbouring pair ``(a, b)`` of the codebook, the least float32 ``x`` for which ggml's
    ``x - a < b - x`` (each side rounded to float32) is false, i.e. where ``best_index_int8`` turns from
    ``a`` to ``b``.  Both sides are monotone in ``x``, so below it every ``x`` picks ``a``; at the exact
    midpoint the sides are equal (ties go up), and the steps below it find where rounding moves the turn."""
    out = []
    for a, b in zip(values[:-1], values[1:]):
        def upper(x, a=a, b=b):
            return not (F32(x - a) < F32(b - x))
        t = F32((a + b) / 2)
        assert upper(t)
        while upper(np.nextafter(t, F32(-np.inf))):
            t = np.nextafter(t, F32(-np.inf))
        out.append(t)
    return np.array(out, F32)


# best_index_int8 as a count of thresholds passed, and the entry as a running sum of the codebook's steps:
# compares and adds only, so the loops over lanes compile to SIMD (ggml's binary search gathers from the
# table at every step, which kept these kernels at ggml's own speed)
TURNS = _thresholds(KVALUES)
STEPS = np.diff(KVALUES).astype(F32)


@njit(**JIT)
def entries(A, G, Q, index):
    """``Q[g]``: the codebook entry ggml's ``best_index_int8(16, kvalues, A[g])`` picks (``index``: its
    index instead).  ``!(a < t)`` counts a NaN past every turn: index 15, as ggml's search ends for NaN."""
    for g in range(G):
        Q[g] = ZERO if index else KVALUES[0]
    for k in range(TURNS.shape[0]):
        t = TURNS[k]
        step = ONE if index else STEPS[k]
        for g in range(G):
            Q[g] += ZERO if A[g] < t else step


@njit(**JIT)
def fit_scales(X, W, G, values, mx, amax, scales, sumqx, sumq2, best, idv, A, Q):
    """Per lane ggml's trial fit: the least-squares scale at ``-max/values[0]`` (0 where the weights are all
    0: an imatrix's unused columns), then at ``(itry +
    values[0])/max`` for ``itry`` in -7..7, the best kept (``sumqx²/sumq2`` largest); 0 for a group whose
    largest |x| is below GROUP_MAX_EPS."""
    first_abs_max(X, G, amax, mx)
    for g in range(G):
        d = -mx[g] / values[0]
        idv[g] = ONE / d
    _sums(X, W, G, idv, sumqx, sumq2, A, Q)
    for g in range(G):
        scales[g] = sumqx[g] / sumq2[g] if sumq2[g] > 0 else ZERO     # 0 where every weight is 0
        best[g] = scales[g] * sumqx[g]
    for itry in range(-NTRY, NTRY + 1):
        for g in range(G):
            idv[g] = F32(itry + int(values[0])) / mx[g]
        _sums(X, W, G, idv, sumqx, sumq2, A, Q)
        for g in range(G):
            if sumq2[g] > 0 and sumqx[g] * sumqx[g] > best[g] * sumq2[g]:
                scales[g] = sumqx[g] / sumq2[g]
                best[g] = scales[g] * sumqx[g]
    for g in range(G):
        scales[g] = ZERO if amax[g] < GROUP_MAX_EPS else scales[g]


@njit(**JIT)
def _sums(X, W, G, idv, sumqx, sumq2, A, Q):
    """ggml's ``sumqx += w*q*x; sumq2 += w*q*q`` over each lane's group, ``q`` the entry picked for
    ``idv*x``."""
    for g in range(G):
        sumqx[g] = ZERO
        sumq2[g] = ZERO
    for i in range(X.shape[0]):
        for g in range(G):
            A[g] = idv[g] * X[i, g]
        entries(A, G, Q, False)
        for g in range(G):
            wq = W[i, g] * Q[g]
            sumqx[g] += wq * X[i, g]
            sumq2[g] += wq * Q[g]


@njit(**JIT)
def codes(X, G, inverse, A, L):
    """``L[i, g]``: every element's index against ``inverse[g]`` (its group's stored scale's reciprocal)."""
    for i in range(X.shape[0]):
        for g in range(G):
            A[g] = inverse[g] * X[i, g]
        entries(A, G, L[i], True)


@njit(**JIT)
def pack_nibbles(L, g, y, b, off):
    """Group ``g``'s indices as nibbles at ``y[b, off:off + 16]``: ``qs[j] = L[j] | L[j + 16] << 4``."""
    for j in range(16):
        y[b, off + j] = np.int64(L[j, g]) | (np.int64(L[j + 16, g]) << 4)


@njit(**JIT)
def quantize_iq4(x, y, qw, b0, with_imatrix, super_groups):
    """IQ4_NL (``super_groups`` 1: d qs[16]) or IQ4_XS (8: d scales_h scales_l[4] qs[128]) of the blocks
    in ``x``; the imatrix weights are ``qw * sqrtf(sigma2 + x²)`` with sigma2 twice the block's mean
    square, else ``x²``."""
    n = 32
    X = np.empty((n, LANES), F32)
    W = np.empty((n, LANES), F32)
    L = np.empty((n, LANES), F32)
    st = np.empty((11, LANES), F32)
    mx, amax, scales, sumqx, sumq2, best, idv, sw = st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7]
    inverse, A, Q = st[8], st[9], st[10]
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
        fit_scales(X, W, G, KVALUES, mx, amax, scales, sumqx, sumq2, best, idv, A, Q)
        for s in range(S):
            if super_groups == 1:
                d = scales[s]
                store_fp16(y, s0 + s, 0, d)
                inverse[s] = ONE / d if d else ZERO
            else:
                _xs_scales(scales, s * 8, y, s0 + s, inverse)
        codes(X, G, inverse, A, L)
        for g in range(G):
            pack_nibbles(L, g, y, s0 + g // super_groups, 2 + 6 * (super_groups > 1) + 16 * (g % super_groups))
    return bad == 0


@njit(**JIT)
def _xs_scales(scales, g0, y, b, inverse):
    """One IQ4_XS super-block's scales from the 8 groups at lane ``g0``: ``d = -max_scale/32`` as f16, each
    group's 6-bit code ``nearest_int(scale/d)`` clamped to -32..31 and stored +32 (low nibbles in
    ``scales_l``, high 2 bits in ``scales_h``); ``inverse`` gets each group's ``1/(d*l)``."""
    d = -largest_scale(scales, g0, 8)[0] / F32(32.0)
    store_fp16(y, b, 0, d)
    inv_d = ONE / d if d else ZERO
    high = 0
    for ib in range(8):
        l = min(max(nearest_int(inv_d * scales[g0 + ib]), -32), 31)
        dl = d * F32(l)
        inverse[g0 + ib] = ONE / dl if dl else ZERO
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
