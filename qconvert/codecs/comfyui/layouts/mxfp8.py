"""``mxfp8`` (Blackwell): FP8 E4M3 values; E8M0 exponents per 32 inputs (stored U8), swizzled.  Blocks too
small for E8M0 (amax <= 448·2^-127) are written as zero blocks.  Activations: E8M0 scales per 32."""

from __future__ import annotations

import torch

from qconvert.codecs.comfyui.blocks import (
    FP8_MAX,
    BlockScaled,
    from_blocked,
    padded,
    padded_shape,
    scale_grid,
    to_blocked,
)

MXFP8_BLOCK = 32


def _ceil_log2(v: torch.Tensor) -> torch.Tensor:
    """ceil(log2 v) exactly, for v > 0 (frexp, not a rounded logarithm)."""
    m, e = torch.frexp(v)
    return torch.where(m == 0.5, e - 1, e)


def encode_mxfp8(w: torch.Tensor) -> tuple[dict, dict]:
    x = padded(w.float(), MXFP8_BLOCK)
    blocks = x.reshape(x.shape[0], -1, MXFP8_BLOCK)
    amax = blocks.abs().amax(-1)
    exponent = (_ceil_log2(torch.clamp(amax / FP8_MAX, min=2.0 ** -127)) + 127).clamp(0, 254)
    scale = torch.exp2((exponent - 127).float()).unsqueeze(-1)
    data = (blocks / scale).clamp(-FP8_MAX, FP8_MAX)
    data = torch.where((exponent == 0).unsqueeze(-1), torch.zeros_like(data), data)  # E8M0 cannot hold the scale
    tensors = {"weight": data.reshape(x.shape).to(torch.float8_e4m3fn),
               "weight_scale": to_blocked(exponent.to(torch.uint8))}
    return tensors, {"format": "mxfp8"}


def decode_mxfp8(tensors: dict, shape: tuple) -> torch.Tensor:
    """The ``shape`` weight (the stored one cropped, when it was padded)."""
    rows, cols = tensors["weight"].shape
    e = from_blocked(tensors["weight_scale"].view(torch.uint8), rows, cols // MXFP8_BLOCK).float()
    scale = torch.where(e == 0, torch.zeros_like(e), torch.exp2(e - 127))
    q = tensors["weight"].float().reshape(rows, -1, MXFP8_BLOCK)
    return (q * scale.unsqueeze(-1)).reshape(rows, cols)[: shape[0], : shape[1]]


class Mxfp8(BlockScaled):
    name = comfy_format = family = "mxfp8"
    loads_in = "ComfyUI with mxfp8 (Mar 2026, #12907) and comfy-kitchen with MXFP8 (else KeyError 'mxfp8')"
    native_on = "native on Blackwell with torch >= 2.10, dequantized elsewhere"
    weight_dtype = "F8_E4M3"
    block = MXFP8_BLOCK
    mix_candidate = True
    in_demo = True

    def stored(self, shape):
        r, c = padded_shape(shape, MXFP8_BLOCK)
        return [("weight", "F8_E4M3", (r, c)), ("weight_scale", "U8", scale_grid(r, c, MXFP8_BLOCK))]

    quantize = staticmethod(encode_mxfp8)
    dequantize = staticmethod(decode_mxfp8)
