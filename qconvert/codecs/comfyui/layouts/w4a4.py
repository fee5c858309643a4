"""``convrot_w4a4`` (experimental in ComfyUI): the ConvRot-rotated weight in signed INT4 (−7..7, two's
complement, the even column in the low nibble), one F32 scale per row (spec comfy-quant.md §3.5).
Activations: rotated, then INT4 per row.  INT4 matmuls from Turing on."""

from __future__ import annotations

import torch

from qconvert.codecs.comfyui.base import Decoder, LayerFormat, StoredLayer, nonnegative, rotation_group
from qconvert.codecs.comfyui.blocks import CONVROT_GROUP, check_width, rotate
from qconvert.core.errors import CheckpointError


def encode_convrot_w4a4(w: torch.Tensor, group: int = CONVROT_GROUP) -> tuple[dict, dict]:
    check_width(w, group, "convrot_w4a4")
    x = rotate(w.float(), group)
    scale = torch.clamp(x.abs().amax(dim=1), min=1e-10) / 7
    q = torch.clamp(torch.round(x / scale[:, None]), -7, 7).to(torch.int8)
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    packed = (nib[:, 0::2] | (nib[:, 1::2] << 4)).view(torch.int8)
    return {"weight": packed, "weight_scale": scale.float()}, {"format": "convrot_w4a4", "convrot_groupsize": group}


def decode_convrot_w4a4(tensors: dict, shape: tuple, conf: dict) -> torch.Tensor:
    b = tensors["weight"].view(torch.uint8)
    nib = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(b.shape[0], -1).to(torch.int16)
    q = torch.where(nib >= 8, nib - 16, nib).float()
    w = q * tensors["weight_scale"].float()[:, None]
    return rotate(w, int(conf.get("convrot_groupsize", CONVROT_GROUP))).reshape(shape)


class ConvrotW4A4(LayerFormat):
    name = family = "convrot-w4a4"
    comfy_format = "convrot_w4a4"
    loads_in = "ComfyUI with convrot_w4a4 (Jul 2026, #14859); experimental"
    native_on = "INT4 matmuls from Turing on"
    weight_dtype = "I8"
    values_per_element = 2
    needs_multiple = CONVROT_GROUP

    def config(self):
        return {"format": self.comfy_format, "convrot_groupsize": CONVROT_GROUP}

    def stored(self, shape):
        rows, cols = shape
        return [("weight", "I8", (rows, cols // 2)), ("weight_scale", "F32", (rows,))]

    def encode(self, w):
        return encode_convrot_w4a4(w)

    def decode(self, tensors, shape, conf):
        return decode_convrot_w4a4(tensors, shape, conf)

    def activations(self, x, conf, input_scale):
        group = int(conf.get("convrot_groupsize", CONVROT_GROUP))
        rows = x.reshape(-1, x.shape[-1])
        t, c = encode_convrot_w4a4(rows, group)
        return decode_convrot_w4a4(t, tuple(rows.shape), c).reshape(x.shape)

    def _decoder(self, layer: StoredLayer, conf: dict, logical) -> Decoder:
        rows, cols = layer.meta["weight"].shape[0], self.stored_columns(layer.meta)
        group = rotation_group(layer.where, conf.get("convrot_groupsize", CONVROT_GROUP), cols)
        scale = layer.meta["weight_scale"]
        if scale.dtype != "F32" or tuple(scale.shape) != (rows,):
            raise CheckpointError(f"{layer.where}: a convrot_w4a4 weight_scale must be F32 [{rows}], not "
                                  f"{scale.dtype} {list(scale.shape)}")
        s4 = nonnegative(layer.where, layer.read("weight_scale"))
        return lambda q: decode_convrot_w4a4({"weight": q, "weight_scale": s4}, (rows, cols),
                                             {"convrot_groupsize": group})
