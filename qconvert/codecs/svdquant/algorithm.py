"""SVDQuant for one linear layer (or one fused group), and what the runtime computes from it.

For ``y = x·Wᵀ + b`` (spec svdquant.md §2):

1. smooth: ``Ŵ = W·diag(s)``, the activations divided by ``s`` at run time,
   with ``s = xmax^α / wmax^β`` chosen from DeepCompressor's grid of
   (α, β) pairs by the layer's output error on calibration rows, with the
   activations quantized and the low-rank branch included;
2. low rank: ``Ŵ ≈ up·down + R`` (a seeded randomized SVD of rank r, the
   singular values in ``up``);
3. residual: ``R`` quantized to INT4 or NVFP4 (``quant.py``);
4. run time: ``y = Q((x + shift)/s)·Q(R)ᵀ + (x·(down/s)ᵀ)·upᵀ + b'``.

The INT4 MLP-down input is shifted by +0.171875 in Nunchaku's fused MLP and
quantized unsigned; ``b' = b − shift·Σₖ Q(R)[n,k]/s[k]`` folds the shift
into the bias.  qconvert uses the dequantized residual ``Q(R)`` there (the
spec allows it or ``R``): it cancels the shift exactly in the quantized
path, so the shift costs nothing but the unsigned grid's extra precision.

Everything here works in logical (unpacked) layout; ``LogicalLayer`` is
both what the converter packs and what the emulator runs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

import torch

from qconvert.codecs.svdquant import quant

GELU_SHIFT = 0.171875  # −(lower bound of tanh-GELU), as DeepCompressor and Nunchaku's kernels use


@dataclass
class LogicalLayer:
    precision: str  # "int4" | "nvfp4"
    codes: torch.Tensor  # [N, K]: int8 −8..7 (INT4) or uint8 E2M1 indices (NVFP4)
    scales: torch.Tensor  # [N, K/64] BF16 (INT4) or [N, K/16] FP8 (NVFP4)
    alpha: torch.Tensor | None  # BF16 [N] (NVFP4): wtscale, or wcscales for fused parts
    smooth: torch.Tensor  # BF16 [K]
    down: torch.Tensor  # BF16 [r, K], already divided by ``smooth``: applied to the raw input
    up: torch.Tensor  # BF16 [N, r]
    bias: torch.Tensor  # BF16 [N], the shift folded in
    shift: float = 0.0  # GELU_SHIFT for Nunchaku's INT4 MLP-down, else 0

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def residual(self) -> torch.Tensor:
        """Q(R), dequantized, in the smoothed space [N, K] (float32)."""
        if self.precision == "nvfp4":
            return quant.FP4Weight(self.codes, self.scales, self.alpha).dequantize()
        return quant.int4_dequantize(self.codes, self.scales)

    @cached_property
    def dequantized(self) -> torch.Tensor:
        """``residual()``, computed once (``build`` sets it from the quantization it just did)."""
        return self.residual()

    def copy(self, **changes) -> "LogicalLayer":
        """The stored fields (not the cached residual), with ``changes``."""
        return LogicalLayer(**{f.name: getattr(self, f.name) for f in fields(self)} | changes)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """What the W4A4 kernel computes (float32 here)."""
        r = self.dequantized if residual is None else residual
        x = x.float()
        xs = (x + self.shift) / self.smooth.float()
        main = quant.activations(xs, self.precision, unsigned=self.shift > 0) @ r.T.to(x.device)
        low = (x @ self.down.float().T) @ self.up.float().T
        return main + low + self.bias.float()


def candidates(grid: int) -> list[tuple[float, float]]:
    """DeepCompressor's (α, β) pairs: (0, 0), then (a, 0) and (a, 1 − a) for a = 1/grid .. (grid−1)/grid."""
    choices = [i / grid for i in range(1, grid)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in choices] + [(a, 1 - a) for a in choices]


def smooth_scale(xmax: torch.Tensor, wmax: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    s = xmax.double().pow(alpha) / wmax.double().pow(beta)
    s = torch.where(s == 0, torch.ones_like(s), s)
    if not bool(torch.isfinite(s).all()):
        s = torch.ones_like(s)
    return s.to(torch.bfloat16)  # stored in BF16: everything below uses the rounded value


def lowrank(a: torch.Tensor, rank: int, *, seed: int = 0, oversample: int = 10, iters: int = 4,
            start: torch.Tensor | None = None) -> tuple:
    """(up [N, r] with the singular values, down [r, K]) of a seeded randomized SVD (Halko et al.):
    deterministic for the same input, device and seed.

    ``start`` [K, q] (a previous call's right subspace, ``down`` rows padded)
    replaces the random start: smoothing candidates differ little, so one
    power iteration from the last candidate's subspace is as good as four
    from a random one.
    """
    n, k = a.shape
    q = min(rank + oversample, n, k)
    if q >= min(n, k):
        u, sv, vh = torch.linalg.svd(a.double(), full_matrices=False)
        return (u[:, :rank] * sv[:rank]).float(), vh[:rank].float(), None
    if start is None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randn(k, q, generator=g, dtype=torch.float32).to(a)
    basis, _ = torch.linalg.qr(a @ start)
    for _ in range(iters):  # power iterations sharpen the range for slowly decaying spectra
        right, _ = torch.linalg.qr(a.T @ basis)
        basis, _ = torch.linalg.qr(a @ right)
    u_small, sv, vh = torch.linalg.svd((basis.T @ a).double(), full_matrices=False)
    u = basis.double() @ u_small
    return (u[:, :rank] * sv[:rank]).float(), vh[:rank].float(), vh[:q].T.float().contiguous()


def build(w: torch.Tensor, b: torch.Tensor, s: torch.Tensor, *, precision: str, rank: int, shift: float = 0.0,
          parts: tuple[int, ...] | None = None, seed: int = 0, warm: dict | None = None) -> LogicalLayer:
    """Smooth by ``s`` (BF16), decompose, quantize the residual, fold the shift: one candidate.

    ``warm`` carries the SVD's subspace from one candidate to the next (see ``lowrank``)."""
    sf = s.float()
    smoothed = w.float() * sf
    if rank:
        start = warm.get("start") if warm is not None else None
        up, down, subspace = lowrank(smoothed, rank, seed=seed, start=start, iters=1 if start is not None else 4)
        if warm is not None:
            warm["start"] = subspace
    else:
        up, down = w.new_zeros(w.shape[0], 0), w.new_zeros(0, w.shape[1])
    up_b, down_b = up.to(torch.bfloat16), down.to(torch.bfloat16)
    residual = smoothed - up_b.float() @ down_b.float()  # against the factors as stored
    if precision == "nvfp4":
        q = quant.fp4_weight(residual, parts)
        codes, scales, alpha = q.codes, q.scales, q.alpha
        r_deq = q.dequantize()
    else:
        codes, scales = quant.int4_weight(residual)
        alpha, r_deq = None, quant.int4_dequantize(codes, scales)
    bias = b.float() - shift * (r_deq / sf).sum(1) if shift else b.float()
    layer = LogicalLayer(precision, codes, scales, alpha, s, (down_b.float() / sf).to(torch.bfloat16), up_b,
                         bias.to(torch.bfloat16), shift)
    layer.dequantized = r_deq  # the search runs the candidate once, with the residual it just made
    return layer


@dataclass
class Choice:
    layer: LogicalLayer
    alpha: float
    beta: float
    error: float  # relative output error on the calibration rows
    plain_error: float  # the same layer with plain 4-bit rounding (no smoothing, no low rank)


def output_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-30))


def search(w: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, xmax: torch.Tensor, *, precision: str, rank: int,
           shift: float = 0.0, parts: tuple[int, ...] | None = None, grid: int = 20, seed: int = 0) -> Choice:
    """The smoothing candidate with the least output error on ``rows`` (activations quantized)."""
    w, b, rows = w.float(), b.float(), rows.float()
    ref = rows @ w.T + b
    wmax = w.abs().amax(0)
    best, warm = None, {}
    for alpha, beta in candidates(grid):
        s = smooth_scale(xmax, wmax, alpha, beta)
        layer = build(w, b, s, precision=precision, rank=rank, shift=shift, parts=parts, seed=seed, warm=warm)
        err = output_error(layer(rows), ref)
        if best is None or err < best[0]:
            best = (err, alpha, beta, s)
        del layer
    # the winner rebuilt from a fresh seeded start: its bytes do not depend on the candidates before it
    layer = build(w, b, best[3], precision=precision, rank=rank, shift=shift, parts=parts, seed=seed)
    plain = build(w, b, torch.ones_like(xmax, dtype=torch.bfloat16), precision=precision, rank=0, parts=parts)
    error = output_error(layer(rows), ref)
    return Choice(layer, best[1], best[2], error, output_error(plain(rows), ref))
