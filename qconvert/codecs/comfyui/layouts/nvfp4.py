"""``nvfp4`` (RTX 50 / Blackwell): E2M1 codes two per byte, the even column in the high nibble; FP8 E4M3
scales per 16 inputs, swizzled (``blocks.to_blocked``); a per-tensor F32 ``weight_scale_2 = amax / 2688``.
An all-zero weight gives zeros, never NaN.  Activations: a dynamic per-tensor scale and FP8 scales per 16."""

from __future__ import annotations

import torch

from qconvert.codecs.comfyui.blocks import (
    BlockScaled,
    from_blocked,
    padded,
    padded_shape,
    scale_grid,
    to_blocked,
)
from qconvert.codecs.minifloat import E2M1_MAX, FP8_MAX, e2m1_rne, e2m1_value

NVFP4_BLOCK = 16


def encode_nvfp4(w: torch.Tensor) -> tuple[dict, dict]:
    x = padded(w.float(), NVFP4_BLOCK)
    g = x.abs().amax() / (FP8_MAX * E2M1_MAX)
    g_safe = torch.clamp(g, min=2.0 ** -126)  # an all-zero weight: zeros, not 0/0
    blocks = x.reshape(x.shape[0], -1, NVFP4_BLOCK)
    s = torch.clamp(blocks.abs().amax(-1) / E2M1_MAX / g_safe, max=FP8_MAX).to(torch.float8_e4m3fn)
    t = (g_safe * s.float()).unsqueeze(-1)
    scaled = torch.where(t == 0, torch.zeros_like(blocks), blocks / torch.where(t == 0, torch.ones_like(t), t))
    codes = e2m1_rne(scaled.clamp(-E2M1_MAX, E2M1_MAX)).reshape(x.shape)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    tensors = {"weight": packed, "weight_scale": to_blocked(s.view(torch.uint8)).view(torch.float8_e4m3fn),
               "weight_scale_2": g.reshape(())}
    return tensors, {"format": "nvfp4"}


def decode_nvfp4(tensors: dict, shape: tuple) -> torch.Tensor:
    """The ``shape`` weight (the stored one cropped, when it was padded)."""
    packed = tensors["weight"]
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(packed.shape[0], -1)
    rows, cols = codes.shape
    s = from_blocked(tensors["weight_scale"].view(torch.uint8), rows, cols // NVFP4_BLOCK)
    scale = s.view(torch.float8_e4m3fn).float() * tensors["weight_scale_2"].float()
    values = e2m1_value(codes).reshape(rows, -1, NVFP4_BLOCK)
    return (values * scale.unsqueeze(-1)).reshape(rows, cols)[: shape[0], : shape[1]]


class Nvfp4(BlockScaled):
    name = comfy_format = family = "nvfp4"
    loads_in = "ComfyUI with nvfp4 (Jan 2026, #11635)"
    native_on = "native on RTX 50 / Blackwell, dequantized elsewhere"
    weight_dtype = "U8"
    values_per_element = 2
    block = NVFP4_BLOCK
    mix_candidate = True
    in_demo = True
    smoothable = True
    # comfy/ops.py applies it at Comfy-Org/ComfyUI 0271a469 (no release named yet); an older ComfyUI reports
    # an unexpected key and multiplies by the smoothed weight alone
    smoothed_loads_in = ("a ComfyUI whose nvfp4 applies pre_quant_scale (Comfy-Org/ComfyUI at 0271a469 does; an "
                         "older one ignores the factors and computes wrong outputs)")

    def stored(self, shape):
        r, c = padded_shape(shape, NVFP4_BLOCK)  # the zero-padded weight is what is stored (spec §3.2)
        return [("weight", "U8", (r, c // 2)), ("weight_scale", "F8_E4M3", scale_grid(r, c, NVFP4_BLOCK)),
                ("weight_scale_2", "F32", ())]

    quantize = staticmethod(encode_nvfp4)
    dequantize = staticmethod(decode_nvfp4)
