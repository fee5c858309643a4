"""The 256-element ggml K-quants Q2_K ... Q6_K in torch.

Each type has ``quantize_<type>(x)`` mirroring ggml's ``quantize_row_<type>_ref``
and ``quantize_<type>_impl(x, qw)`` mirroring ``quantize_row_<type>_impl`` (the
importance-matrix path).  ``x`` is ``(B, 256)`` float32 super-blocks, ``qw``
the matching ``(B, 256)`` imatrix entries; all return ``(B, type_size)`` uint8.

The structure is always ggml's: fit a scale (and min) per 16/32-element group
(:mod:`._fit`), quantize those to 4/6/8 bits against one f16 super-block scale,
then *requantize* every element against the stored, rounded values, keeping the
first-pass codes of a group whose stored scale is zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qconvert.codecs.gguf._fit import (
    GROUP_MAX_EPS,
    I32,
    div,
    f16_bytes,
    f16_round,
    first_abs_max,
    from_groups,
    indices,
    make_q3_quants,
    make_qkx2_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    seq_sum,
    sqrtf,
    to_groups,
)

U8 = torch.uint8


def _superblock_sum_x2(x: Tensor) -> Tensor:
    """``sum_x2 += x[l]*x[l]`` over the 256 elements, in order."""
    xt = x.T.contiguous()
    return seq_sum(xt * xt)


def _imatrix_groups(x: Tensor, qw: Tensor, sigma2: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``x`` as position-major groups of ``n`` and their weights
    ``qw[l] * sqrtf(sigma2 + x[l]*x[l])``."""
    s2 = sigma2.repeat_interleave(256 // n)
    g = to_groups(x, n)
    return g, to_groups(qw, n) * sqrtf((g * g).add_(s2))


def _per_block(v: Tensor, n_blocks: int) -> Tensor:
    """Per-group values ``(G,)`` as ``(B, groups_per_block)``."""
    return v.reshape(n_blocks, -1)


def _positive_max(v: Tensor) -> Tensor:
    """``m = 0; if (v[j] > m) m = v[j]`` over a block's groups."""
    m = v.amax(1)
    return torch.where(m > 0, m, 0.0)


def _inverse_or_zero(num: float, m: Tensor) -> Tensor:
    """``m > 0 ? num/m : 0``."""
    return torch.where(m > 0, div(num, torch.where(m > 0, m, 1.0)), 0.0)


def _requantize(x: Tensor, L: Tensor, dd: Tensor, dm: Tensor | None, lo: int, hi: int, offset: int) -> Tensor:
    """Codes against the stored scales, ``clamp(nearest_int((x + dm)/dd)) +
    offset`` (``x/dd`` without a min), as int32; groups whose ``dd`` is 0 keep
    their first-pass codes ``L``.  ``x``/``L`` are ``(B, groups, n)``,
    ``dd``/``dm`` ``(B, groups)``."""
    num = x if dm is None else x + dm[..., None]
    l = nearest_int(div(num, dd[..., None])).clamp_(lo, hi).add_(offset)
    kept = indices(dd.reshape(-1) == 0)
    if kept is not None:
        n = x.shape[-1]
        l.view(-1, n)[kept] = L.reshape(-1, n)[kept].to(I32)
    return l


def _pack_2bit(L: Tensor) -> Tensor:
    """``qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6``
    for ``j`` in {0, 128}; ``L`` is ``(B, 256)`` int32 in 0..3."""
    L = L.view(-1, 2, 4, 32)
    q = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
    return q.reshape(-1, 64).to(U8)


# ---------------------------------------------------------------- Q2_K

def quantize_q2_k(x: Tensor) -> Tensor:
    """``quantize_row_q2_K_ref``: 16 groups of 16, ``weights = |x|``,
    ``make_qkx2_quants(16, 3, ..., -0.5f, 0.1f, 15, true)``, 4-bit scale and
    min codes against ``max_scale/15`` and ``max_min/15``."""
    B = x.shape[0]
    g = to_groups(x, 16)
    scales, mins, L = make_qkx2_quants(g, g.abs(), 3, -0.5, 0.1, 15, True)
    scales, mins = _per_block(scales, B), _per_block(mins, B)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    ls = nearest_int(_inverse_or_zero(15.0, max_scale)[:, None] * scales) & 0xFF
    lm = nearest_int(_inverse_or_zero(15.0, max_min)[:, None] * mins)
    return _finish_q2_k(x, from_groups(L, B), (ls | (lm << 4)) & 0xFF, div(max_scale, 15.0), div(max_min, 15.0))


def quantize_q2_k_impl(x: Tensor, qw: Tensor) -> Tensor:
    """``quantize_row_q2_K_impl``: weights ``qw*sqrt(sigma2 + x^2)`` with
    ``sigma2 = sum(x^2)/256``, ``make_qkx3_quants(16, 3, ..., -0.9f, 0.05f, 36)``
    and ``make_qp_quants(16, 15, ...)`` for the scale and min codes."""
    B = x.shape[0]
    sigma2 = div(_superblock_sum_x2(x), 256.0)
    g, w = _imatrix_groups(x, qw, sigma2, 16)
    sw = _per_block(seq_sum(w), B).T                     # (16, B)
    scales, mins, L = make_qkx2_quants(g, w, 3, -0.9, 0.05, 36, False)
    dm, Ls = make_qp_quants(_per_block(scales, B).T.contiguous(), 15, sw)
    mm, Lm = make_qp_quants(_per_block(mins, B).T.contiguous(), 15, sw)
    sc = (Ls.T.to(I32) | (Lm.T.to(I32) << 4)) & 0xFF
    return _finish_q2_k(x, from_groups(L, B), sc, dm, mm)


def _finish_q2_k(x: Tensor, L: Tensor, sc: Tensor, d: Tensor, dmin: Tensor) -> Tensor:
    """Store ``d``/``dmin`` as f16, requantize, pack: scales[16] qs[64] d dmin."""
    d_stored, dmin_stored = f16_round(d)[:, None], f16_round(dmin)[:, None]
    dd = d_stored * (sc & 0xF)
    dm = dmin_stored * (sc >> 4)
    L = _requantize(x.view(-1, 16, 16), L.view(-1, 16, 16), dd, dm, 0, 3, 0)
    qs = _pack_2bit(L.reshape(-1, 256))
    return torch.cat([sc.to(U8), qs, f16_bytes(d), f16_bytes(dmin)], 1)


# ---------------------------------------------------------------- Q3_K

def quantize_q3_k(x: Tensor) -> Tensor:
    """``quantize_row_q3_K_ref``: ``make_q3_quants(16, 4, x, L, true)`` per
    group, 6-bit signed scale codes against ``d = max_scale/-32``."""
    B = x.shape[0]
    scales, L = make_q3_quants(to_groups(x, 16), 4)
    scales = _per_block(scales, B)
    max_scale = first_abs_max(scales.T)
    nonzero = max_scale != 0
    iscale = div(-32.0, torch.where(nonzero, max_scale, 1.0))
    ls = nearest_int(iscale[:, None] * scales).clamp_(-32, 31).add_(32)
    ls = torch.where(nonzero[:, None], ls, 0)
    d = torch.where(nonzero, div(1.0, iscale), 0.0)
    return _finish_q3_k(x, from_groups(L, B), ls, d)


def quantize_q3_k_impl(x: Tensor, qw: Tensor) -> Tensor:
    """``quantize_row_q3_K_impl``: ``sigma2 = 2*sum(x^2)/256``, weights
    ``qw*sqrt(sigma2 + x^2)``, ``make_qx_quants(16, 4, ...)`` per group and
    ``make_qx_quants(16, 32, scales, Ls, 1, sw)`` for the block scale."""
    B = x.shape[0]
    sigma2 = div(_superblock_sum_x2(x) * 2, 256.0)
    g, w = _imatrix_groups(x, qw, sigma2, 16)
    sw = _per_block(seq_sum(w), B).T
    scales, L = make_qx_quants(g, 4, w)
    d, Ls = make_qx_quants(_per_block(scales, B).T.contiguous(), 32, sw)
    return _finish_q3_k(x, from_groups(L, B), Ls.T.to(I32), d)


def _finish_q3_k(x: Tensor, L: Tensor, ls: Tensor, d: Tensor) -> Tensor:
    """Pack the 6-bit codes ``ls`` (0..63, scale ``ls - 32``), requantize and
    pack: hmask[32] qs[64] scales[12] d.  ``ls`` decodes to itself, so the
    requantize step uses it directly."""
    lo, hi = ls & 0xF, ls >> 4
    scale_bytes = torch.cat([
        lo[:, :8] | (lo[:, 8:] << 4),
        hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6),
    ], 1)
    dd = f16_round(d)[:, None] * (ls - 32)
    L = _requantize(x.view(-1, 16, 16), L.view(-1, 16, 16), dd, None, -4, 3, 4).view(-1, 8, 32)
    high = L >> 2                                      # codes are 0..7: bit 2 is "> 3"
    hmask = sum(high[:, k] << k for k in range(8))
    qs = _pack_2bit((L & 3).reshape(-1, 256))
    return torch.cat([hmask.to(U8), qs, scale_bytes.to(U8), f16_bytes(d)], 1)


# ---------------------------------------------------------------- Q4_K / Q5_K shared parts

def _k_ref_groups(x: Tensor, nmax: int, rmin: float, nstep: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``_ref`` group fit of Q4_K/Q5_K: ``av_x = sqrt(sum(x^2)/32)``,
    ``weights = av_x + |x|``, ``make_qkx2_quants(32, nmax, ..., rmin, 0.1f, nstep)``."""
    g = to_groups(x, 32)
    av_x = sqrtf(div(seq_sum(g * g), 32.0))
    return make_qkx2_quants(g, g.abs().add_(av_x), nmax, rmin, 0.1, nstep, False)


def _k_ref_codes(scales: Tensor, mins: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """6-bit codes ``MIN(63, (uint8_t)nearest_int(63/max * v))`` and the
    super-block ``d = max_scale/63``, ``dmin = max_min/63``."""
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    ls = (nearest_int(_inverse_or_zero(63.0, max_scale)[:, None] * scales) & 0xFF).clamp_(max=63)
    lm = (nearest_int(_inverse_or_zero(63.0, max_min)[:, None] * mins) & 0xFF).clamp_(max=63)
    return ls, lm, div(max_scale, 63.0), div(max_min, 63.0)


def _k_impl_groups(x: Tensor, qw: Tensor, nmax: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The imatrix fit of Q4_K/Q5_K: ``sigma2 = 2*sum(x^2)/256``, weights
    ``qw*sqrt(sigma2 + x^2)``, ``make_qkx3_quants(32, nmax, ..., -0.9f, 0.05f, 36)``,
    then ``make_qp_quants(8, 63, ...)`` for scales and mins.  Returns the
    ``uint8`` codes ``Ls, Lm`` (B, 8), ``d``, ``dmin`` and ``L`` (B, 256)."""
    B = x.shape[0]
    sigma2 = div(_superblock_sum_x2(x) * 2, 256.0)
    g, w = _imatrix_groups(x, qw, sigma2, 32)
    sw = _per_block(seq_sum(w), B).T
    scales, mins, L = make_qkx2_quants(g, w, nmax, -0.9, 0.05, 36, False)
    d, Ls = make_qp_quants(_per_block(scales, B).T.contiguous(), 63, sw)
    dmin, Lm = make_qp_quants(_per_block(mins, B).T.contiguous(), 63, sw)
    return Ls.T.to(I32), Lm.T.to(I32), d, dmin, from_groups(L, B)


def _pack_scale_min_k4(ls: Tensor, lm: Tensor) -> Tensor:
    """ggml's 12-byte packing of eight 6-bit (scale, min) pairs; codes above
    63 lose bits exactly as ggml's ``uint8_t`` stores do."""
    return torch.cat([
        ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
        lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
        (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
    ], 1) & 0xFF


def _unpack_scale_min_k4(q: Tensor) -> tuple[Tensor, Tensor]:
    """``get_scale_min_k4`` for all eight groups."""
    sc = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], 1)
    m = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], 1)
    return sc, m


def _finish_k4(x: Tensor, L: Tensor, ls: Tensor, lm: Tensor, d: Tensor, dmin: Tensor, nmax: int):
    """Pack the codes, store ``d``/``dmin`` and requantize with the decoded
    6-bit values.  Returns (head bytes d|dmin|scales[12], L (B, 4, 2, 32))."""
    scale_bytes = _pack_scale_min_k4(ls, lm)
    sc, m = _unpack_scale_min_k4(scale_bytes)
    dd = f16_round(d)[:, None] * sc
    dm = f16_round(dmin)[:, None] * m
    L = _requantize(x.view(-1, 8, 32), L.view(-1, 8, 32), dd, dm, 0, nmax, 0)
    head = torch.cat([f16_bytes(d), f16_bytes(dmin), scale_bytes.to(U8)], 1)
    return head, L.view(-1, 4, 2, 32)


# ---------------------------------------------------------------- Q4_K

def _pack_q4_k(head: Tensor, L: Tensor) -> Tensor:
    """d dmin scales[12] qs[128]; ``qs[32c + l] = L[64c+l] | L[64c+32+l] << 4``."""
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128).to(U8)
    return torch.cat([head, qs], 1)


def quantize_q4_k(x: Tensor) -> Tensor:
    """``quantize_row_q4_K_ref``: ``make_qkx2_quants(32, 15, ..., -1.f, 0.1f, 20)``."""
    B = x.shape[0]
    scales, mins, L = _k_ref_groups(x, 15, -1.0, 20)
    ls, lm, d, dmin = _k_ref_codes(_per_block(scales, B), _per_block(mins, B))
    return _pack_q4_k(*_finish_k4(x, from_groups(L, B), ls, lm, d, dmin, 15))


def quantize_q4_k_impl(x: Tensor, qw: Tensor) -> Tensor:
    """``quantize_row_q4_K_impl`` (its codes are stored without ``MIN(63, .)``)."""
    Ls, Lm, d, dmin, L = _k_impl_groups(x, qw, 15)
    return _pack_q4_k(*_finish_k4(x, L, Ls, Lm, d, dmin, 15))


# ---------------------------------------------------------------- Q5_K

def _pack_q5_k(head: Tensor, L: Tensor) -> Tensor:
    """d dmin scales[12] qh[32] qs[128]: low nibbles as Q4_K; element
    ``64c + l`` sets bit ``2c`` of ``qh[l]``, element ``64c + 32 + l`` bit ``2c+1``."""
    qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(-1, 128).to(U8)
    high = L >> 4                                     # (B, 4, 2, 32) in 0..1
    qh = sum((high[:, c, 0] << (2 * c)) | (high[:, c, 1] << (2 * c + 1)) for c in range(4))
    return torch.cat([head, qh.to(U8), qs], 1)


def quantize_q5_k(x: Tensor) -> Tensor:
    """``quantize_row_q5_K_ref``: ``make_qkx2_quants(32, 31, ..., -0.5f, 0.1f, 15)``."""
    B = x.shape[0]
    scales, mins, L = _k_ref_groups(x, 31, -0.5, 15)
    ls, lm, d, dmin = _k_ref_codes(_per_block(scales, B), _per_block(mins, B))
    return _pack_q5_k(*_finish_k4(x, from_groups(L, B), ls, lm, d, dmin, 31))


def quantize_q5_k_impl(x: Tensor, qw: Tensor) -> Tensor:
    """``quantize_row_q5_K_impl`` (codes clamped with ``MIN(63, .)``)."""
    Ls, Lm, d, dmin, L = _k_impl_groups(x, qw, 31)
    return _pack_q5_k(*_finish_k4(x, L, Ls.clamp(max=63), Lm.clamp(max=63), d, dmin, 31))


# ---------------------------------------------------------------- Q6_K

def _finish_q6_k(x: Tensor, scales: Tensor, L: Tensor) -> Tensor:
    """int8 scale codes against ``d = max_scale/-128``, requantize, pack:
    ql[128] qh[64] scales[16] d.  A block whose largest |scale| is below
    GROUP_MAX_EPS is all zero bytes."""
    max_scale = first_abs_max(scales.T)
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = div(-128.0, torch.where(zero, 1.0, max_scale))
    d = div(1.0, iscale)
    sc = nearest_int(iscale[:, None] * scales).clamp_(max=127)
    dd = f16_round(d)[:, None] * sc
    L = _requantize(x.view(-1, 16, 16), L.view(-1, 16, 16), dd, None, -32, 31, 32)
    L = L.view(-1, 2, 4, 32)                           # half, quarter, l
    ql = ((L[:, :, 0:2] & 0xF) | ((L[:, :, 2:4] & 0xF) << 4)).reshape(-1, 128)
    high = L >> 4
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    out = torch.cat([ql.to(U8), qh.to(U8), sc.to(torch.int8).view(U8), f16_bytes(d)], 1)
    idx = indices(zero)
    if idx is not None:
        out[idx] = 0
    return out


def quantize_q6_k(x: Tensor) -> Tensor:
    """``quantize_row_q6_K_ref``: ``make_qx_quants(16, 32, x, L, 1, NULL)``."""
    B = x.shape[0]
    g = to_groups(x, 16)
    scales, L = make_qx_quants(g, 32, g * g)
    return _finish_q6_k(x, _per_block(scales, B), from_groups(L, B))


def quantize_q6_k_impl(x: Tensor, qw: Tensor) -> Tensor:
    """``quantize_row_q6_K_impl``: ``make_qx_quants(16, 32, x, L, 1, qw)``."""
    B = x.shape[0]
    scales, L = make_qx_quants(to_groups(x, 16), 32, to_groups(qw, 16))
    return _finish_q6_k(x, _per_block(scales, B), from_groups(L, B))
