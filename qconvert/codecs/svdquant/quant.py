"""The 4-bit number formats of SVDQuant files, as logical tensors (packing is ``packing.py``).

* INT4 weights: groups of 64 inputs, symmetric ``absmax / 7``, BF16 scales;
  codes rounded against the BF16-rounded scale (spec svdquant.md §2.4).
* NVFP4 weights: E2M1 codes, FP8 E4M3 scales per 16 inputs, and a BF16
  per-tensor α (``wtscale``; per output channel as ``wcscales`` when parts
  are fused), ``α = max(absmax / 6) / 448``.
* Activations, as the kernels quantize them per token: INT4 groups of 64
  (``absmax / 7`` signed, ``/ 15`` unsigned, scale in the input dtype),
  NVFP4 groups of 16 (``min(absmax / 6, 448)`` in FP8, no tensor scale).
  Rounding is to nearest (the spec leaves the kernels' mode unconfirmed).
* AWQ W4A16 (modulation layers): groups of 64, codes 0..15 with a scale and
  a zero per group, dequantized as ``q · scale + zero``.  qconvert uses the
  asymmetric min/max grid (any zero is format-legal; DeepCompressor's
  symmetric one wastes a code and loses more on these layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUP = 64
FP4_GROUP = 16
AWQ_GROUP = 64
FP8_MAX = 448.0
E2M1_MAX = 6.0
# E2M1 codebook in index order: bit 3 the sign, bits 2..0 the magnitude
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _groups(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] % size:
        raise ValueError(f"{x.shape[-1]} inputs are not a whole number of groups of {size}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale)


# --------------------------------------------------------------- INT4

def int4_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (codes int8 [N, K] in −8..7, scales BF16 [N, K/64])."""
    g = _groups(w.float(), INT4_GROUP)
    scales = (g.abs().amax(-1) / 7).to(torch.bfloat16)
    codes = torch.round(g / _safe(scales.float())[..., None]).clamp(-8, 7)
    return codes.reshape(w.shape).to(torch.int8), scales


def int4_dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    g = _groups(codes.float(), INT4_GROUP)
    return (g * scales.float()[..., None]).reshape(codes.shape)


def int4_activations(x: torch.Tensor, *, unsigned: bool = False) -> torch.Tensor:
    """Fake-quantized activations (per token, groups of 64), in float32."""
    g = _groups(x.float(), INT4_GROUP)
    top = 15 if unsigned else 7
    scale = (g.abs().amax(-1, keepdim=True) / top).to(x.dtype if x.dtype != torch.float32 else torch.bfloat16)
    scale = _safe(scale.float())
    q = torch.round(g / scale).clamp(0 if unsigned else -8, top)
    return (q * scale).reshape(x.shape)


# -------------------------------------------------------------- NVFP4

def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 index (ties to the lower index, so ±0 is +0; beyond ±6 saturates), uint8."""
    mag = torch.bucketize(x.abs(), torch.tensor(_MIDPOINTS, dtype=x.dtype, device=x.device), right=False)
    negative = (x < 0) & (mag > 0)
    return torch.where(negative, mag + 8, mag).to(torch.uint8)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    return torch.tensor(E2M1, dtype=torch.float32, device=codes.device)[codes.long()]


@dataclass
class FP4Weight:
    codes: torch.Tensor  # uint8 [N, K], E2M1 indices
    scales: torch.Tensor  # float8_e4m3fn [N, K/16]
    alpha: torch.Tensor  # BF16 [N]: the per-tensor α of the part each output row belongs to

    def dequantize(self) -> torch.Tensor:
        g = _groups(e2m1_values(self.codes), FP4_GROUP)
        return (g * self.scales.float()[..., None]).reshape(self.codes.shape) * self.alpha.float()[:, None]


def fp4_weight(w: torch.Tensor, parts: tuple[int, ...] | None = None) -> FP4Weight:
    """[N, K] -> NVFP4, one α per part of the rows (fused q/k/v: three parts)."""
    parts = parts or (w.shape[0],)
    codes, scales, alphas = [], [], []
    for part in torch.split(w.float(), list(parts)):
        g = _groups(part, FP4_GROUP)
        group_max = g.abs().amax(-1) / E2M1_MAX
        alpha = (group_max.max() / FP8_MAX).to(torch.bfloat16)
        a = _safe(alpha.float())
        s1 = (group_max / a).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
        codes.append(e2m1_codes(g / (a * _safe(s1.float()))[..., None]).reshape(part.shape))
        scales.append(s1)
        alphas.append(alpha.expand(part.shape[0]))
    return FP4Weight(torch.cat(codes), torch.cat(scales), torch.cat(alphas).contiguous())


def fp4_activations(x: torch.Tensor) -> torch.Tensor:
    g = _groups(x.float(), FP4_GROUP)
    scale = (g.abs().amax(-1, keepdim=True) / E2M1_MAX).clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float()
    scale = _safe(scale)
    return (e2m1_values(e2m1_codes(g / scale)) * scale).reshape(x.shape)


def activations(x: torch.Tensor, precision: str, *, unsigned: bool = False) -> torch.Tensor:
    return fp4_activations(x) if precision == "nvfp4" else int4_activations(x, unsigned=unsigned)


# ---------------------------------------------------------------- AWQ

def awq_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> (codes uint8 0..15, scales BF16 [N, K/64], zeros BF16 [N, K/64]); w ≈ q·scale + zero."""
    g = _groups(w.float(), AWQ_GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15).to(torch.bfloat16)
    zeros = lo.to(torch.bfloat16)
    codes = torch.round((g - zeros.float()[..., None]) / _safe(scales.float())[..., None]).clamp(0, 15)
    return codes.reshape(w.shape).to(torch.uint8), scales, zeros


def awq_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    g = _groups(codes.float(), AWQ_GROUP)
    return (g * scales.float()[..., None] + zeros.float()[..., None]).reshape(codes.shape)
