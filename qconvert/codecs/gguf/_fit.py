"""ggml's scale-fitting routines (``src/ggml-quants.c``), vectorised over groups.

Every routine takes its groups in *position-major* layout: a ``(n, G)`` float32
tensor whose row ``i`` holds element ``i`` of each of the ``G`` groups.  ggml
accumulates its sums one element at a time in float32, and rounding makes that
order matter, so a sum over a group is :func:`seq_sum` in ggml's element
order, never ``Tensor.sum``.

Exactness rules followed throughout:

* one IEEE float32 operation per torch call, in ggml's association order
  (``w*l*x`` is ``(w*l)*x``), so no fused multiply-add can appear;
* ``nearest_int`` is round-half-to-even (``torch.round``) wherever the argument
  is provably inside ggml's exact range, and the bit-exact emulation
  :func:`nearest_int` where it is not;
* a division with a scalar on one side goes through :func:`div`, a square
  root through :func:`sqrtf` (see there).

Speed rules (torch on the CPU): comparisons, ``where``, ``argmax``/``argmin``
and anything else producing or consuming bool tensors are 3-30x slower than
arithmetic, so full-size tensors only see arithmetic and reductions; bool
masks exist per group only, and the rare groups that need ggml's special cases
(all zero, ties, subnormal spans) are fixed up afterwards by index.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

F32 = torch.float32
I32 = torch.int32


def f32(value: float) -> float:
    """``value`` rounded to float32, as the C literal or expression would be."""
    return float(np.float32(value))


GROUP_MAX_EPS = f32(1e-15)
_NEAREST_INT_EXACT = 4194303.0   # |f| bound of ggml's nearest_int bit trick


def div(a: Tensor | float, b: Tensor | float) -> Tensor:
    """IEEE float32 ``a / b`` where one side may be a Python scalar.

    torch computes ``scalar / tensor`` as ``tensor.reciprocal() * scalar`` and,
    on CUDA, ``tensor / scalar`` as a multiplication by ``1 / scalar``; both
    round twice.  A tensor operand gets a true division everywhere.
    """
    if not isinstance(a, Tensor):
        a = torch.full_like(b, a)
    elif not isinstance(b, Tensor):
        b = torch.full_like(a, b)
    return torch.div(a, b)


def scalars(values: list[float], like: Tensor) -> Tensor:
    """float32 0-d tensors (rows of one tensor) on ``like``'s device, for
    :func:`div` numerators without a ``full_like`` per call."""
    return torch.tensor(values, dtype=F32, device=like.device)


def sqrtf(t: Tensor) -> Tensor:
    """Correctly rounded float32 square root, like C ``sqrtf``.  torch's CPU
    float32 ``sqrt`` (MKL VML) is off by one ulp now and then; a float64
    square root rounded to float32 is exact (53 >= 2*24 + 2 bits)."""
    return t.double().sqrt_().to(F32)


def nearest_int(t: Tensor) -> Tensor:
    """ggml ``nearest_int`` bit for bit, as int32, including its result for
    ``|t| > 4194303`` and NaN/Inf (where ggml's debug assert would fire)."""
    v = t + 12582912.0
    return (v.view(I32) & 0x007FFFFF) - 0x00400000


def round_clamp_(u: Tensor, lo: int, hi: int) -> Tensor:
    """In place ``clamp(nearest_int(u), lo, hi)`` as float32, for arguments
    bounded inside ``nearest_int``'s exact range."""
    return u.round_().clamp_(lo, hi)


def select(take: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``torch.where(take, new, old)`` for float32 as an exact bit blend; on
    stacked ``(k, G)`` states it is several times faster than ``where``."""
    mask = take.to(I32).neg_()
    o = old.view(I32)
    return (o ^ ((o ^ new.view(I32)) & mask)).view(F32)


def _flag(compare, a: Tensor, b: Tensor | float, like: Tensor | None = None) -> Tensor:
    """A comparison as float32 1/0 shaped like ``like`` (default ``a``); a bool
    result is several times slower on the CPU."""
    return compare(a, b, out=torch.empty_like(a if like is None else like))


def indices(mask: Tensor) -> Tensor | None:
    """The indices where a per-group ``mask`` holds, or None when none does."""
    return mask.nonzero()[:, 0] if bool(mask.any()) else None


def seq_sum(terms: Tensor) -> Tensor:
    """``s = 0; for i: s += terms[i]`` in float32 (ggml's loop order).

    A loop of in-place adds is exact anywhere but costs a kernel launch per
    term on a GPU, so where one torch call provably sums in index order it is
    used instead (checked once per device type, :func:`_ordered_sum`): on the
    CPU ``index_add_`` into a single row; on CUDA ``cumsum`` along the outer
    dimension, whose kernel walks each column in order in float32 (CUDA's
    ``index_add_`` uses atomics, in no fixed order; the CPU ``cumsum``
    accumulates in float64)."""
    return _ORDERED_SUMS.get(_ordered_sum(terms.device.type), _loop_sum)(terms)


def _loop_sum(terms: Tensor) -> Tensor:
    acc = torch.zeros_like(terms[0])
    for t in terms:
        acc.add_(t)
    return acc


def _index_add_sum(terms: Tensor) -> Tensor:
    acc = torch.zeros_like(terms[:1])
    return acc.index_add_(0, torch.zeros(terms.shape[0], dtype=torch.long, device=terms.device), terms)[0]


def _cumsum_sum(terms: Tensor) -> Tensor:
    return terms.cumsum(0)[-1]


_ORDERED_SUMS = {"index_add": _index_add_sum, "cumsum": _cumsum_sum}


@functools.cache
def _ordered_sum(device_type: str) -> str:
    """The first single-call sum that gives the loop's bits on this device
    type, or ``"loop"``."""
    for how, fn in _ORDERED_SUMS.items():
        if sums_like_loop(fn, torch.device(device_type)):
            return how
    return "loop"


def sums_like_loop(fn, device: torch.device) -> bool:
    """Whether ``fn(terms)`` gives the bits of :func:`_loop_sum` on terms whose
    magnitudes span 2^±30 (any other order or a wider accumulator rounds
    differently somewhere), signed zeros included, short and long sums."""
    gen = torch.Generator().manual_seed(0)
    for shape in ((64, 3, 999), (3000, 7)):
        terms = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-30, 30, shape, generator=gen))
        terms[:, 0] = -0.0
        terms = terms.to(device)
        want, got = _loop_sum(terms), fn(terms)
        if got.shape != want.shape or not torch.equal(got.view(I32), want.view(I32)):
            return False
    return True


# --------------------------------------------------------------------------
# ggml's running extremes, first occurrence winning.


def first_abs_max(x: Tensor) -> Tensor:
    """ggml's ``if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }``
    from ``amax = max = 0``: the signed element of largest ``|x|``, the first
    one when both signs reach it, and +0 for an all-zero group."""
    hi, lo = x.amax(0), x.amin(0)
    m = torch.where(-lo > hi, lo, hi) + 0.0          # + 0.0 turns -0 into +0
    tie = indices((-lo == hi) & (hi > 0))
    if tie is not None:
        sub = x[:, tie]
        m[tie] = sub.gather(0, sub.abs().argmax(0, keepdim=True))[0]
    return m


def first_min(x: Tensor) -> Tensor:
    """ggml's running ``if (x[i] < min) min = x[i]`` from ``x[0]``: the first
    minimal element, so a zero minimum carries ggml's sign."""
    m = x.amin(0)
    zero = indices(m == 0)
    if zero is not None:
        sub = x[:, zero]
        m[zero] = sub.gather(0, sub.argmin(0, keepdim=True))[0]
    return m


# --------------------------------------------------------------------------
# storage helpers


def f16_bytes(t: Tensor) -> Tensor:
    """``GGML_FP32_TO_FP16`` (round to nearest even) of a ``(B,)`` tensor as
    ``(B, 2)`` little-endian bytes."""
    return t.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def f16_round(t: Tensor) -> Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(t))``: the value ggml stores."""
    return t.to(torch.float16).to(F32)


def to_groups(blocks: Tensor, n: int) -> Tensor:
    """``(B, block)`` blocks -> position-major ``(n, B*block/n)`` groups of
    ``n`` consecutive elements, group ``g`` being block ``g // (block/n)``."""
    return blocks.reshape(-1, n).T.contiguous()


def from_groups(groups: Tensor, n_blocks: int) -> Tensor:
    """Inverse of :func:`to_groups`."""
    return groups.T.reshape(n_blocks, -1)


# --------------------------------------------------------------------------
# make_qx_quants (rmse_type 1): symmetric signed scale, L stored +nmax.


def _qx_numerators(nmax: int) -> list[float]:
    # ggml: iscale = -nmax/max, then -(nmax + 0.1f*is)/max for is = -9..9, is != 0
    steps = [s for s in range(-9, 10) if s]
    return [float(-nmax)] + [float(-(np.float32(nmax) + np.float32(0.1) * np.float32(s))) for s in steps]


def make_qx_quants(x: Tensor, nmax: int, w: Tensor) -> tuple[Tensor, Tensor]:
    """ggml ``make_qx_quants(n, nmax, x, L, 1, w)``; for ``qw == NULL`` pass
    ``w = x*x``.  Returns ``(scale (G,), L (n, G) in 0..2*nmax-1)``."""
    n, G = x.shape
    mx = first_abs_max(x)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, 1.0, mx)       # keeps the arithmetic finite; fixed up below
    wx = w * x
    terms = x.new_empty((n, 2, G))
    nums = scalars(_qx_numerators(nmax), x)

    def sums(iscale: Tensor) -> Tensor:
        l = round_clamp_(x * iscale, -nmax, nmax - 1)
        torch.mul(wx, l, out=terms[:, 0])             # sumlx += w*x[i]*l
        torch.mul(w, l, out=terms[:, 1]).mul_(l)      # suml2 += w*l*l
        return seq_sum(terms)

    iscale = torch.div(nums[0], mx)
    sumlx, suml2 = sums(iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    state = torch.stack([scale, scale * sumlx, iscale])      # scale, best, its iscale
    for num in nums[1:]:
        iscale = torch.div(num, mx)
        sumlx, suml2 = sums(iscale)
        take = (suml2 > 0) & (sumlx * sumlx > state[1] * suml2)
        new_scale = sumlx / suml2
        state = select(take, torch.stack([new_scale, new_scale * sumlx, iscale]), state)
    L = round_clamp_(x * state[2], -nmax, nmax - 1).add_(nmax)
    scale = state[0].clone()
    idx = indices(zero)
    if idx is not None:
        scale[idx] = 0.0
        L[:, idx] = 0.0
    return scale, L


# --------------------------------------------------------------------------
# make_q3_quants(n, nmax, x, L, do_rmse=true): Q3_K's per-group scale.


def make_q3_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Returns ``(scale (G,), L (n, G) in 0..2*nmax-1)``."""
    n, G = x.shape
    mx = first_abs_max(x)
    zero = mx.abs() < GROUP_MAX_EPS
    iscale = div(float(-nmax), torch.where(zero, 1.0, mx))
    L = round_clamp_(x * iscale, -nmax, nmax - 1)
    w = x * x
    wx = w * x
    terms = x.new_empty((n, 2, G))
    torch.mul(wx, L, out=terms[:, 0])
    torch.mul(w, L, out=terms[:, 1]).mul_(L)
    sumlx, suml2 = seq_sum(terms)
    _q3_descent(x, w, wx, L, sumlx, suml2, nmax)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    L.add_(nmax)
    idx = indices(zero)
    if idx is not None:
        scale[idx] = 0.0
        L[:, idx] = 0.0
    return scale, L


def _q3_descent(x: Tensor, w: Tensor, wx: Tensor, L: Tensor, sumlx: Tensor, suml2: Tensor, nmax: int) -> None:
    """make_q3_quants' coordinate descent, in place on ``L``/``sumlx``/``suml2``.

    ggml visits the elements one by one, up to 5 passes, stopping after a pass
    without change.  Until a group accepts a change its state is fixed, so one
    *round* evaluates all remaining positions of a pass at once against the
    current state and applies only the first accepted change; the group then
    continues after that position.  Groups leave the working set (and are
    written back) as soon as a pass ends without change: after the first
    round that is most of them."""
    n = x.shape[0]
    pos = torch.arange(n, device=x.device, dtype=F32)[:, None]
    ids = torch.arange(x.shape[1], device=x.device)
    xa, wa, wxa, La = x, w, wx, L
    zeros = torch.zeros_like(sumlx)
    # per group: sumlx, suml2, next position of the pass, passes started, pass changed something
    state = torch.stack([sumlx, suml2, zeros, zeros, zeros])
    while True:
        sx, s2, p0 = state[0], state[1], state[2]
        slx = sx - wxa * La                                 # w*x[i]*L[i]
        sl2 = s2 - (wa * La).mul_(La)
        new_l = nearest_int(div(xa * sl2, slx)).clamp_(-nmax, nmax - 1).to(F32)
        # accept where slx > 0, new_l != L, then (after adding new_l's terms)
        # sl2 > 0 and slx*slx*suml2 > sumlx*sumlx*sl2, at positions >= p0
        ok = _flag(torch.gt, slx, 0.0)
        ok.mul_(_flag(torch.ne, new_l, La))
        slx.add_(wxa * new_l)
        sl2.add_((wa * new_l).mul_(new_l))
        ok.mul_(_flag(torch.gt, sl2, 0.0))
        ok.mul_(_flag(torch.gt, (slx * slx).mul_(s2), sl2 * (sx * sx)))
        ok.mul_(_flag(torch.ge, pos, p0, like=xa))
        first = (ok * (pos - n)).add_(n).amin(0)          # first accepted position, n if none
        hit = indices(first < n)
        if hit is not None:
            at = first[hit].long()
            La[at, hit] = new_l[at, hit]                   # the first round updates the caller's L

            state[0, hit] = slx[at, hit]
            state[1, hit] = sl2[at, hit]
            state[4, hit] = 1.0
        state[2] = torch.minimum(first + 1, torch.full_like(first, n))
        # a pass is over when it reached the end; another follows if it changed
        # something and fewer than 5 have run
        ended = state[2] >= n
        again = ended & (state[4] > 0) & (state[3] < 4)
        restart = indices(again)
        if restart is not None:
            state[2, restart] = 0.0
            state[3, restart] += 1.0
            state[4, restart] = 0.0
        keep = ~ended | again
        done = indices(~keep)
        if done is not None:
            if La is not L:                               # (the first round wrote into L itself)
                L.index_copy_(1, ids[done], La.index_select(1, done))
            sumlx.index_copy_(0, ids[done], state[0, done])
            suml2.index_copy_(0, ids[done], state[1, done])
        kept = indices(keep)
        if kept is None:
            return
        ids, state = ids[kept], state.index_select(1, kept)
        xa, wa, wxa, La = (t.index_select(1, kept) for t in (xa, wa, wxa, La))


# --------------------------------------------------------------------------
# make_qkx2_quants: asymmetric scale and min, L in 0..nmax.


def make_qkx2_quants(
    x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """ggml ``make_qkx2_quants`` (also ``make_qkx3_quants`` with explicit
    weights: after ``if (min > 0) min = 0`` ``max >= min`` always holds, so its
    ``max <= min`` test is the same as ``max == min``).

    Returns ``(scale (G,), the_min (G,) = -min, L (n, G))``.  The rounding
    uses the fast ``torch.round``; the rare groups where a rounded argument
    could leave ``nearest_int``'s exact range (spans so small that ``iscale``
    overflows) are redone with the bit-exact emulation."""
    args = (nmax, rmin, rdelta, nstep, use_mad)
    scale, the_min, L, reach = _qkx2(x, w, *args, exact=False)
    wild = indices(~(reach <= _NEAREST_INT_EXACT))
    if wild is not None:
        scale[wild], the_min[wild], L[:, wild], _ = _qkx2(x[:, wild], w[:, wild], *args, exact=True)
    return scale, the_min, L


def _qkx2(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool,
          exact: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The body of :func:`make_qkx2_quants`.  Also returns ``reach``, an upper
    bound of every ``|iscale*(x - min)|`` it rounded (rounding is monotonic, so
    ``|iscale|*(max|x| + |min|)`` bounds them).

    As in ggml the candidate loop rounds around the *currently adopted* min,
    not the data minimum.  The L of the winner is recomputed at the end from
    the (iscale, min) pair it was rounded with, which gives the same values."""
    n, G = x.shape
    lo = first_min(x)
    hi = x.amax(0)
    mn = torch.where(lo > 0, 0.0, lo)
    flat = hi == mn
    # a flat group is returned as ggml's early exit below; an infinite span
    # makes its iscale 0 meanwhile, so it rounds to zeros without NaN.
    mx = torch.where(flat, float("inf"), hi)
    xmax = torch.maximum(hi, -lo)
    wx = w * x
    sum_w = w[0].clone()
    sum_x = wx[0].clone()
    for i in range(1, n):
        sum_w.add_(w[i])
        sum_x.add_(wx[i])

    def rounded(iscale: Tensor, shift: Tensor) -> Tensor:
        u = (x - shift).mul_(iscale)
        return nearest_int(u).clamp_(0, nmax).to(F32) if exact else round_clamp_(u, 0, nmax)

    def error_of(scale: Tensor, shift: Tensor, l: Tensor) -> Tensor:
        diff = (l * scale).add_(shift).sub_(x)          # scale*L + min - x
        diff = diff.abs_() if use_mad else diff.mul_(diff)
        return seq_sum(diff.mul_(w))                    # err += w*diff

    nums = scalars([float(nmax)] + [float(np.float32(rmin) + np.float32(rdelta) * np.float32(s) + np.float32(nmax))
                                    for s in range(nstep + 1)], x)
    iscale = torch.div(nums[0], mx - mn)
    reach = (xmax - mn).mul_(iscale)
    scale = div(1.0, iscale)
    # state rows: best_error, iscale and min the winner was rounded with, scale, min
    state = torch.stack([error_of(scale, mn, rounded(iscale, mn)), iscale, mn, scale, mn])
    terms = x.new_empty((n, 3, G))
    for num in nums[1:]:
        mn = state[4]
        iscale = torch.div(num, mx - mn)
        reach = torch.maximum(reach, (xmax - mn).mul_(iscale))
        laux = rounded(iscale, mn)
        wl = torch.mul(w, laux, out=terms[:, 0])        # sum_l  += w*l
        torch.mul(wl, laux, out=terms[:, 1])            # sum_l2 += w*l*l
        torch.mul(wl, x, out=terms[:, 2])               # sum_xl += w*l*x
        sum_l, sum_l2, sum_xl = seq_sum(terms)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clip = this_min > 0
        this_min = torch.where(clip, 0.0, this_min)
        this_scale = torch.where(clip, sum_xl / sum_l2, this_scale)
        cur_error = error_of(this_scale, this_min, laux)
        take = (D > 0) & (cur_error < state[0])
        state = select(take, torch.stack([cur_error, iscale, mn, this_scale, this_min]), state)
    L = rounded(state[1], state[2])
    scale, mn = state[3].clone(), state[4]
    idx = indices(flat)
    if idx is not None:
        scale[idx] = 0.0
        L[:, idx] = 0.0
    return scale, -mn, L, reach


# --------------------------------------------------------------------------
# make_qp_quants: non-negative scales/mins of the imatrix K-quants, 0..nmax.
# It runs on a few values per super-block, so clarity wins over speed here.


def _as_uint8(l: Tensor) -> Tensor:
    """C's store of an int into ``uint8_t L[]`` (wraps modulo 256)."""
    return (l.to(I32) & 0xFF).to(F32)


def make_qp_quants(x: Tensor, nmax: int, qw: Tensor) -> tuple[Tensor, Tensor]:
    """ggml ``make_qp_quants(n, nmax, x, L, quant_weights)``; ``x`` (n, G) are
    a super-block's scales or mins.  L is ggml's ``uint8_t`` array, so a
    negative code wraps exactly as it does there.  Returns ``(scale, L)``."""
    n = x.shape[0]
    mx = x.amax(0)
    zero = ~(mx >= GROUP_MAX_EPS)     # ggml's running MAX starts at 0
    mx = torch.where(zero, 1.0, mx)

    def clipped(iscale: Tensor) -> Tensor:
        return nearest_int(x * iscale).clamp_(max=nmax).to(F32)

    def mse_of(scale: Tensor, l: Tensor) -> Tensor:
        diff = x - scale * l
        return seq_sum(qw * diff * diff)               # mse += w*diff*diff

    iscale = div(float(nmax), mx)
    best_mse = mse_of(div(1.0, iscale), _as_uint8(nearest_int(x * iscale)))
    for step in range(-4, 5):
        if step:
            iscale_is = div(float(np.float32(0.1) * np.float32(step) + np.float32(nmax)), mx)
            mse = mse_of(div(1.0, iscale_is), clipped(iscale_is))
            take = mse < best_mse
            best_mse = torch.where(take, mse, best_mse)
            iscale = torch.where(take, iscale_is, iscale)
    l = clipped(iscale)
    wx = qw * x
    sumlx = seq_sum(wx * l)
    suml2 = seq_sum(qw * l * l)
    L = _as_uint8(l)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(n):
            wi, wxi, xi, li = qw[i], wx[i], x[i], L[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new_l = nearest_int(div(xi * sl2, slx)).clamp_(max=nmax).to(F32)
            take = (slx > 0) & (sl2 > 0) & (new_l != li)
            slx = slx + wxi * new_l
            sl2 = sl2 + wi * new_l * new_l
            take &= slx * slx * suml2 > sumlx * sumlx * sl2
            L[i] = torch.where(take, _as_uint8(new_l), li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return scale.masked_fill_(zero, 0.0), L.masked_fill_(zero[None], 0)
