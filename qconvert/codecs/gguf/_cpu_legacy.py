"""ggml's legacy 32-element types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) compiled with numba; see ``_cpu``."""

from __future__ import annotations

import numpy as np
from numba import njit

from qconvert.codecs.gguf._cpu_core import (
    F32,
    JIT,
    LEGACY_LANES,
    ONE,
    ZERO,
    as_f32,
    cvtt,
    fp32_to_fp16,
    imatrix_lanes,
    int8_of,
    make_qkx2_quants,
    make_qx_quants,
    nonfinite,
    roundf,
    to_lanes,
)

# ---------------------------------------------------------------- legacy 32-element blocks
# Q8_0: d qs[32]; Q4_0: d qs[16]; Q4_1: d m qs[16]; Q5_0: d qh[4] qs[16]; Q5_1: d m qh[4] qs[16].
# One block per lane.  The per-block code indexes y[b, ...] rather than taking
# row views: each view costs numba a reference count, as much as a block's work.

@njit(**JIT)
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


@njit(**JIT)
def quantize_row_q8_0_ref(x, y):
    """ggml ``quantize_row_q8_0_ref``: ``d = amax/127``, ``qs = roundf(x*id)``
    stored as ``int8_t`` (``id`` infinite for a tiny block gives 0).

    Block by block, not in lanes as the other legacy types: Q8_0's codes are
    its bytes, so lanes would only add two transposes (a copy in and a
    byte-by-byte copy out); the 32-value loops here run in SIMD as they are,
    about 1.5x the lane version's speed (``benchmarks/bench_quants.py``)."""
    big = F32(np.finfo(np.float32).max)
    v = np.empty(32, F32)
    q = np.empty(32, np.int32)
    bad = 0
    for b in range(x.shape[0]):
        amax = ZERO                                   # amax = MAX(amax, fabsf(v))
        for j in range(32):
            f = as_f32(x[b, j])
            v[j] = f
            a = abs(f)
            bad += not (a <= big)                     # NaN/Inf, counted on the way
            amax = amax if amax > a else a
        d = amax / F32(127.0)
        inv = ONE / d if d != 0 else ZERO
        for j in range(32):
            q[j] = cvtt(roundf(v[j] * inv))
        h = fp32_to_fp16(d)
        y[b, 0] = h & 0xFF
        y[b, 1] = h >> 8
        for j in range(32):
            y[b, 2 + j] = q[j] & 0xFF
    return bad == 0


@njit(**JIT)
def legacy_extremes(X, G, with_min, lo, hi, nonfin):
    """Per lane what ggml's legacy ``_ref`` quantizers derive ``d`` from: for
    Q4_1/Q5_1 the block's ``min`` and ``max`` into ``lo``/``hi`` (``if (v <
    min) min = v`` from ``FLT_MAX``, ``max`` alike from ``-FLT_MAX``); for
    Q4_0/Q5_0 :func:`first_abs_max`'s ``amax`` and ``max``.  ``nonfin`` gets
    0, or a NaN/Inf of the lane: the check rides on this pass instead of
    making one of its own (:func:`nonfinite`, about 6% of Q4_0's time)."""
    big = F32(np.finfo(np.float32).max)
    for g in range(G):
        lo[g] = big if with_min else ZERO
        hi[g] = -big if with_min else ZERO
        nonfin[g] = ZERO
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


@njit(**JIT)
def legacy_code(v, inv, bias, top):
    """``MIN(top, (int8_t)(v*id + bias))`` as a byte: Q5_1's ``(uint8_t)(v*id +
    0.5f)`` is the same byte with ``top`` 255."""
    return min(top, int8_of(cvtt(v * inv + bias))) & 0xFF


@njit(**JIT)
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
            inv[g] = ONE / d[g] if d[g] != 0 else ZERO
            lo[g] = lo[g] if with_min else ZERO        # x - 0 is x, -0 included
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


@njit(**JIT)
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
