"""The 32-element ggml types Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 in torch.

Each type has ``quantize_<type>(x)`` mirroring ggml's ``quantize_row_<type>_ref``
and, except Q8_0 (ggml's ``quantize_q8_0`` ignores the importance matrix),
``quantize_<type>_impl(x, qw, sigma2)`` mirroring ``quantize_row_<type>_impl``.
``x`` is ``(B, 32)`` float32 blocks; ``qw`` the matching ``(B, 32)`` imatrix
entries; ``sigma2`` ``(B,)`` the ``sum(x*x)/n_per_row`` of each block's row.
All return ``(B, type_size)`` uint8.  The work happens on position-major
``(32, B)`` groups (see ``_fit``); the ``_ref`` quantizers sum nothing, so for
them that is just the transposed view ``x.T``.

The ``_ref`` codes are float32 ``x*id + 8.5f`` (and friends) truncated by an
integer cast, with ``id`` the *unrounded* ``1/d``.  A block so small that
``id`` overflows gets the codes x86 gives ``(int)`` of Inf/NaN: 0.

gguf-py has ``_ref`` ports of these but not the ``_impl`` ones, and its
Q4_0/Q4_1/Q5_0/Q5_1 differ from ggml on signed zeros (an all-zero block that
starts with -0.0 gets ``d = +0`` where ggml writes -0; the sign of a zero
minimum) and on subnormal blocks, hence this port.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qconvert.codecs.gguf._fit import (
    I32,
    div,
    f16_bytes,
    first_abs_max,
    first_min,
    indices,
    make_qkx2_quants,
    make_qx_quants,
    sqrtf,
    to_groups,
)

U8 = torch.uint8
_BELOW_HALF = 0.49999997  # the largest float32 below 0.5


def _inverse(d: Tensor) -> Tensor:
    """``d ? 1.0f/d : 0.0f``."""
    return torch.where(d != 0, div(1.0, d), 0.0)


def _zero_overflowed(q: Tensor, inv: Tensor) -> Tensor:
    """Codes 0 for blocks whose ``id`` is Inf (x86 ``cvttss2si`` of Inf/NaN
    is 0x80000000, whose low byte is 0)."""
    bad = indices(~torch.isfinite(inv))
    if bad is not None:
        q[:, bad] = 0
    return q


def _roundf(v: Tensor) -> Tensor:
    """C ``roundf`` (half away from zero) for |v| < 2^23: adding the largest
    float below 0.5 rounds to the next integer exactly when |frac(v)| >= 0.5,
    and unlike ``floor(v + 0.5)`` leaves 0.49999997 below 1."""
    return (v + torch.copysign(torch.full_like(v, _BELOW_HALF), v)).trunc_()


def _pack_nibbles(q: Tensor) -> Tensor:
    """``qs[j] = q[j] & 15 | (q[j+16] & 15) << 4`` from codes ``(32, B)``."""
    return ((q[:16] & 0xF) | ((q[16:] & 0xF) << 4)).T.to(U8)


def _pack_high_bits(q: Tensor) -> Tensor:
    """The u32 ``qh`` of Q5_0/Q5_1 (bit ``j`` = bit 4 of code ``j``) as 4 bytes."""
    bits = ((q >> 4) & 1).view(4, 8, -1)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=I32, device=q.device)[:, None]
    return (bits * weights).sum(1).T.to(U8)


def _symmetric_params(g: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """``max`` = the signed value of largest ``|x|``; ``d = max / -nmax``."""
    d = div(first_abs_max(g), float(-nmax))
    return d, _inverse(d)


def _asymmetric_params(g: Tensor, nmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """``min``/``max`` over the block (no clamp to 0); ``d = (max-min)/nmax``
    (``+ 0.0``: a constant block gives ggml's ``x0 - x0 = +0``)."""
    mn = first_min(g)
    d = div(g.amax(0) - mn + 0.0, float(nmax))
    return d, _inverse(d), mn


def _row_weights(g: Tensor, qw: Tensor, sigma2: Tensor) -> Tensor:
    """``qw[j] * sqrtf(sigma2 + x[j]*x[j])``, position-major."""
    return to_groups(qw, 32) * sqrtf((g * g).add_(sigma2))


# ---------------------------------------------------------------- Q8_0

def quantize_q8_0(x: Tensor) -> Tensor:
    """``quantize_row_q8_0_ref``: ``d = amax/127``, ``q = roundf(x*id)``."""
    g = x.T
    amax = torch.maximum(g.amax(0), -g.amin(0)) + 0.0
    d = div(amax, 127.0)
    inv = _inverse(d)
    q = _zero_overflowed(_roundf(g * inv), inv).to(torch.int8)
    return torch.cat([f16_bytes(d), q.T.view(U8)], 1)


# ---------------------------------------------------------------- Q4_0

def quantize_q4_0(x: Tensor) -> Tensor:
    """``quantize_row_q4_0_ref``: ``q = MIN(15, (int8_t)(x*id + 8.5f))``."""
    g = x.T
    d, inv = _symmetric_params(g, 8)
    q = _zero_overflowed((g * inv).add_(8.5).clamp_(max=15).to(I32), inv)
    return torch.cat([f16_bytes(d), _pack_nibbles(q)], 1)


def quantize_q4_0_impl(x: Tensor, qw: Tensor, sigma2: Tensor) -> Tensor:
    """``quantize_row_q4_0_impl``: ``make_qx_quants(32, 8, x, L, 1, weight)``."""
    g = to_groups(x, 32)
    d, L = make_qx_quants(g, 8, _row_weights(g, qw, sigma2))
    return torch.cat([f16_bytes(d), _pack_nibbles(L.to(I32))], 1)


# ---------------------------------------------------------------- Q4_1

def quantize_q4_1(x: Tensor) -> Tensor:
    """``quantize_row_q4_1_ref``: ``q = MIN(15, (int8_t)((x-min)*id + 0.5f))``."""
    g = x.T
    d, inv, mn = _asymmetric_params(g, 15)
    q = _zero_overflowed((g - mn).mul_(inv).add_(0.5).clamp_(max=15).to(I32), inv)
    return torch.cat([f16_bytes(d), f16_bytes(mn), _pack_nibbles(q)], 1)


def quantize_q4_1_impl(x: Tensor, qw: Tensor, sigma2: Tensor) -> Tensor:
    """``quantize_row_q4_1_impl``: ``make_qkx3_quants(32, 15, ..., -0.9f, 0.05f, 36)``
    with ``d = scale`` and ``m = -the_min``."""
    g = to_groups(x, 32)
    d, the_min, L = make_qkx2_quants(g, _row_weights(g, qw, sigma2), 15, -0.9, 0.05, 36, False)
    return torch.cat([f16_bytes(d), f16_bytes(-the_min), _pack_nibbles(L.to(I32))], 1)


# ---------------------------------------------------------------- Q5_0

def quantize_q5_0(x: Tensor) -> Tensor:
    """``quantize_row_q5_0_ref``: ``q = MIN(31, (int8_t)(x*id + 16.5f))``."""
    g = x.T
    d, inv = _symmetric_params(g, 16)
    q = _zero_overflowed((g * inv).add_(16.5).clamp_(max=31).to(I32), inv)
    return torch.cat([f16_bytes(d), _pack_high_bits(q), _pack_nibbles(q)], 1)


def quantize_q5_0_impl(x: Tensor, qw: Tensor, sigma2: Tensor) -> Tensor:
    """``quantize_row_q5_0_impl``: ``make_qx_quants(32, 16, x, L, 1, weight)``."""
    g = to_groups(x, 32)
    d, L = make_qx_quants(g, 16, _row_weights(g, qw, sigma2))
    q = L.to(I32)
    return torch.cat([f16_bytes(d), _pack_high_bits(q), _pack_nibbles(q)], 1)


# ---------------------------------------------------------------- Q5_1

def quantize_q5_1(x: Tensor) -> Tensor:
    """``quantize_row_q5_1_ref``: ``q = (uint8_t)((x-min)*id + 0.5f)``, no clamp
    (the maximum lands on 31)."""
    g = x.T
    d, inv, mn = _asymmetric_params(g, 31)
    q = _zero_overflowed((g - mn).mul_(inv).add_(0.5).to(I32), inv)
    return torch.cat([f16_bytes(d), f16_bytes(mn), _pack_high_bits(q), _pack_nibbles(q)], 1)


def quantize_q5_1_impl(x: Tensor, qw: Tensor, sigma2: Tensor) -> Tensor:
    """``quantize_row_q5_1_impl``: ``make_qkx3_quants(32, 31, ..., -0.9f, 0.05f, 36)``."""
    g = to_groups(x, 32)
    d, the_min, L = make_qkx2_quants(g, _row_weights(g, qw, sigma2), 31, -0.9, 0.05, 36, False)
    q = L.to(I32)
    return torch.cat([f16_bytes(d), f16_bytes(-the_min), _pack_high_bits(q), _pack_nibbles(q)], 1)
