"""FP8 storage types and the per-tensor scaled cast every FP8 layout uses (spec fp8-lora-sampler.md §3).

Casting: ``w * (1 / scale)`` in float32, clamped to ±``finfo.max``, then ``.to(float8)``, which rounds to
nearest even; the clamp makes NaN/Inf impossible whatever the torch version or device.  A multiply by the
rounded reciprocal, not a division, because that is what comfy-kitchen's ``quantize_per_tensor_fp8`` does
(spec comfy-quant.md §8.3): with BF16 sources many ``w / scale`` fall exactly on an FP8 rounding tie, which the
reciprocal's rounding moves off it, so dividing changed up to 0.9% of a layer's codes by one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from qconvert.codecs.comfyui.base import LayerFormat


@dataclass(frozen=True)
class Fp8Type:
    """One FP8 storage type under its four names."""

    name: str  # the CLI name
    dtype: torch.dtype
    st_type: str  # safetensors dtype
    comfy_format: str  # ComfyUI's comfy_quant "format"

    @property
    def max(self) -> float:
        return float(torch.finfo(self.dtype).max)


FP8_TYPES: Mapping[str, Fp8Type] = {
    "e4m3fn": Fp8Type("e4m3fn", torch.float8_e4m3fn, "F8_E4M3", "float8_e4m3fn"),
    "e5m2": Fp8Type("e5m2", torch.float8_e5m2, "F8_E5M2", "float8_e5m2"),
}
BY_COMFY_FORMAT = {t.comfy_format: t for t in FP8_TYPES.values()}
BY_ST_TYPE = {t.st_type: t for t in FP8_TYPES.values()}


def quantize_fp8(weight: torch.Tensor, fp8: Fp8Type) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled FP8: ``(q, scale)`` with ``weight ≈ q.float() * scale``.

    ``scale = amax / fmt_max`` (F32, shape ``[]``), so the largest magnitude
    lands exactly on the format's maximum and small weights keep their bits.
    """
    x = weight.to(torch.float32, copy=True)  # a copy: the in-place ops below must not touch the caller's tensor
    lo, hi = torch.aminmax(x)
    scale = torch.maximum(hi, -lo) / fp8.max
    if not bool(scale >= torch.finfo(torch.float32).tiny):
        # amax == 0 (an all-zero weight) would make the scale 0 and w/scale NaN,
        # and ComfyUI re-quantizes LoRA-patched weights by dividing by it too.
        # Below float32's smallest normal the scale itself is inexact.  Such a
        # tensor is zero for every practical purpose: scale 1 stores it as the
        # FP8 rounding of its values (zeros) and dequantizes without NaN.
        scale = torch.ones((), dtype=torch.float32, device=x.device)
    x.mul_(1.0 / scale).clamp_(-fp8.max, fp8.max)
    return x.to(fp8.dtype), scale.reshape(())


def cast_fp8(weight: torch.Tensor, fp8: Fp8Type) -> torch.Tensor:
    """The plain layout's unscaled cast, clamped so out-of-range values saturate instead of becoming NaN/Inf."""
    return weight.to(torch.float32, copy=True).clamp_(-fp8.max, fp8.max).to(fp8.dtype)


class Fp8Layer(LayerFormat):
    """A ComfyUI-layout FP8 layer (``to-fp8 --format comfy`` writes the whole file; mixes use ``fp8``): a
    per-tensor F32 scale; the matmul in full precision as Comfy-Org's exporter writes it (spec §7.2), or, in
    files with ``input_scale``, an FP8 matmul whose input is scaled by it (1.0 when absent: beyond ±448
    saturates)."""

    family = "fp8"
    loads_in = "ComfyUI with comfy_quant support (newer than 0.3.64)"
    native_on = "FP8 matmuls on RTX 40/50 and Hopper; dequantized elsewhere"
    in_to_comfy = False

    def __init__(self, name: str, fp8: Fp8Type, mix_candidate: bool):
        self.name, self.fp8, self.mix_candidate = name, fp8, mix_candidate
        self.comfy_format, self.weight_dtype = fp8.comfy_format, fp8.st_type

    def config(self):
        return {"format": self.comfy_format, "full_precision_matrix_mult": True}

    def stored(self, shape):
        return [("weight", self.weight_dtype, tuple(shape)), ("weight_scale", "F32", ())]

    def encode(self, w):
        q, scale = quantize_fp8(w, self.fp8)
        return {"weight": q, "weight_scale": scale}, self.config()

    def decode(self, tensors, shape, conf):
        return (tensors["weight"].float() * tensors["weight_scale"].float()).reshape(shape)

    def activations(self, x, conf, input_scale):
        s = input_scale.float().to(x.device) if input_scale is not None else torch.tensor(1.0, device=x.device)
        rows = x.reshape(-1, x.shape[-1])
        return ((rows / s).clamp(-self.fp8.max, self.fp8.max).to(self.fp8.dtype).float() * s).reshape(x.shape)


FP8 = Fp8Layer("fp8", FP8_TYPES["e4m3fn"], mix_candidate=True)
FP8_E5M2 = Fp8Layer("fp8-e5m2", FP8_TYPES["e5m2"], mix_candidate=False)
