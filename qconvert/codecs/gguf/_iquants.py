"""ggml's IQ4_NL and IQ4_XS in torch (any device); ``_cpu_iquants`` is the same compiled for the CPU.

Both store 4-bit indices into one fixed non-linear codebook (``kvalues_iq4nl``: denser near zero,
where trained weights are) times a scale per 32 elements:

* IQ4_NL, 18 bytes per 32: ``d`` (f16), ``qs[16]``;
* IQ4_XS, 136 bytes per 256 (4.25 bits a weight): ``d`` (f16), ``scales_h`` (u16: 2 high bits of each
  group's 6-bit scale code), ``scales_l[4]`` (their low nibbles, two groups a byte), ``qs[128]``; group
  ``ib``'s scale is ``d * (code - 32)``.

In both, ``qs[16*ib + j]`` holds element ``j`` of group ``ib`` in its low nibble and element ``j + 16`` in
its high one, as Q4_0 does.  ggml's ``quantize_row_iq4_nl_impl`` fits each group's scale by least
squares at fifteen trial scales around ``-max/127`` (``ntry`` 7), weighting the elements by ``x²``, or
with an importance matrix by ``qw * sqrtf(sigma2 + x²)`` (sigma2: twice the super-block's mean square);
the indices are then chosen against the scale as stored.  There is no separate reference routine: ggml's
``quantize_row_iq4_*_ref`` is this one without an importance matrix.  ``x`` is ``(B, block)`` float32
blocks and ``qw`` the matching ``(B, block)`` importances; each function returns ``(B, type_size)``
uint8.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qconvert.codecs.gguf._fit import (
    GROUP_MAX_EPS,
    I32,
    div,
    f16_bytes,
    first_abs_max,
    from_groups,
    nearest_int,
    seq_sum,
    sqrtf,
    to_groups,
)

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
NTRY = 7
U8 = torch.uint8


def best_index(values: Tensor, a: Tensor) -> Tensor:
    """ggml ``best_index_int8(16, values, a)`` elementwise: the nearest entry, the upper one on a tie, as
    ggml's binary search ends (``values[ml] <= a < values[ml+1]``, then ``a - values[ml] < values[ml+1] -
    a``); ``!(a < v)`` steps up, so NaN ends at 15 as in ggml."""
    ml = torch.zeros(a.shape, dtype=torch.long, device=a.device)
    for step in (8, 4, 2, 1):
        ml += (~(a < values[ml + step])).long() * step
    ml.clamp_(max=14)
    return ml + (~((a - values[ml]) < (values[ml + 1] - a))).long()


def _weights(x: Tensor, X: Tensor, qw: Tensor | None) -> Tensor:
    """Position-major ``(32, G)`` element weights: ``x²``, or ``qw * sqrtf(sigma2 + x²)`` with ``sigma2 =
    sum(x²) * (2/block)`` summed over the whole block in order."""
    if qw is None:
        return X * X
    xt = x.T.contiguous()
    sigma2 = seq_sum(xt * xt) * (2.0 / x.shape[1])          # a power of two: exact, as ggml's 2.f/size
    per_group = sigma2.repeat_interleave(x.shape[1] // 32)
    return to_groups(qw, 32) * sqrtf(X * X + per_group)


def _fit(X: Tensor, W: Tensor, values: Tensor) -> Tensor:
    """Each group's scale: ggml's least-squares fit at ``-max/values[0]`` (0 where the weights are all 0:
    an imatrix's unused columns), then at ``(itry + values[0]) /
    max`` for ``itry`` in -7..7, keeping the one with the largest ``sumqx²/sumq2``; 0 for a group whose
    largest |x| is below GROUP_MAX_EPS."""
    m = first_abs_max(X)

    def sums(inverse: Tensor) -> tuple[Tensor, Tensor]:
        q = values[best_index(values, inverse * X)]
        wq = W * q
        return seq_sum(wq * X), seq_sum(wq * q)

    sumqx, sumq2 = sums(div(1.0, div(-m, float(KVALUES[0]))))
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumq2))      # 0 where every weight is 0
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = sums(div(float(itry + KVALUES[0]), m))
        take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        new = sumqx / sumq2
        d = torch.where(take, new, d)
        best = torch.where(take, new * sumqx, best)
    return torch.where(m.abs() < GROUP_MAX_EPS, torch.zeros_like(d), d)


def _inverse(d: Tensor) -> Tensor:
    """C's ``d ? 1/d : 0.f`` (NaN is true, -0 false)."""
    return torch.where(d != 0, div(1.0, d), torch.zeros_like(d))


def _nibbles(X: Tensor, inverse: Tensor, values: Tensor, n_blocks: int) -> Tensor:
    """Every group's indices against ``inverse`` per group, packed ``qs[16*ib + j] = L[j] | L[j+16] << 4``:
    ``(n_blocks, block/2)`` uint8."""
    L = best_index(values, inverse * X)
    return from_groups(L[:16] | (L[16:] << 4), n_blocks).to(U8)


def _quantize_iq4_nl(x: Tensor, qw: Tensor | None) -> Tensor:
    values = torch.tensor(KVALUES, dtype=torch.float32, device=x.device)
    X = to_groups(x, 32)
    d = _fit(X, _weights(x, X, qw), values)
    return torch.cat([f16_bytes(d), _nibbles(X, _inverse(d), values, x.shape[0])], 1)


def _quantize_iq4_xs(x: Tensor, qw: Tensor | None) -> Tensor:
    values = torch.tensor(KVALUES, dtype=torch.float32, device=x.device)
    B = x.shape[0]
    X = to_groups(x, 32)
    scales = _fit(X, _weights(x, X, qw), values).view(B, 8)
    max_scale = first_abs_max(scales.T)
    d = div(-max_scale, 32.0)
    l = nearest_int(_inverse(d)[:, None] * scales).clamp_(-32, 31)
    group_inverse = _inverse(d[:, None] * l.float()).reshape(-1)
    code = (l + 32).to(I32)
    low = code & 0xF
    scales_l = (low[:, 0::2] | (low[:, 1::2] << 4)).to(U8)
    high = sum((code[:, ib] >> 4) << (2 * ib) for ib in range(8))
    scales_h = torch.stack([high & 0xFF, high >> 8], 1).to(U8)
    return torch.cat([f16_bytes(d), scales_h, scales_l, _nibbles(X, group_inverse, values, B)], 1)


def quantize_iq4_nl(x: Tensor) -> Tensor:
    """``quantize_row_iq4_nl_ref``."""
    return _quantize_iq4_nl(x, None)


def quantize_iq4_nl_impl(x: Tensor, qw: Tensor) -> Tensor:
    """``quantize_iq4_nl`` with an importance matrix."""
    return _quantize_iq4_nl(x, qw)


def quantize_iq4_xs(x: Tensor) -> Tensor:
    """``quantize_row_iq4_xs_ref``."""
    return _quantize_iq4_xs(x, None)


def quantize_iq4_xs_impl(x: Tensor, qw: Tensor) -> Tensor:
    """``quantize_iq4_xs`` with an importance matrix."""
    return _quantize_iq4_xs(x, qw)
