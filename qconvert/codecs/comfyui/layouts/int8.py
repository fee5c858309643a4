"""``int8_tensorwise``: INT8 weights with a per-tensor or per-row (``[out, 1]``) F32 scale, optionally after
ConvRot, a fixed block-Hadamard rotation of each 256 inputs that spreads outliers (no seed; ComfyUI rebuilds
it).  Three of qconvert's names store it: ``int8`` (per row, ConvRot), ``int8-row`` and ``int8-tensor``.
Activations: INT8 per row, after the rotation when the layer has one.  INT8 matmuls from Turing (sm 7.5) on."""

from __future__ import annotations

import torch

from qconvert.codecs.comfyui.base import Decoder, LayerFormat, StoredLayer, nonnegative, rotation_group
from qconvert.codecs.comfyui.blocks import CONVROT_GROUP, check_width, int8_rows, rotate
from qconvert.core import untrusted
from qconvert.core.errors import CheckpointError


def encode_int8(w: torch.Tensor, *, per_row: bool = True, convrot: bool = True,
                group: int = CONVROT_GROUP) -> tuple[dict, dict]:
    x = w.float()
    conf = {"format": "int8_tensorwise"}
    if convrot:
        check_width(w, group, "int8 convrot")
        x = rotate(x, group)
        conf.update(convrot=True, convrot_groupsize=group)
    amax = x.abs().amax(dim=1, keepdim=True) if per_row or convrot else x.abs().amax()
    scale = torch.clamp(amax / 127, min=1e-30)
    q = torch.clamp(torch.round(x / scale), -128, 127).to(torch.int8)
    return {"weight": q, "weight_scale": scale.float()}, conf


def decode_int8(tensors: dict, shape: tuple, conf: dict) -> torch.Tensor:
    w = tensors["weight"].float() * tensors["weight_scale"].float()
    if conf.get("convrot"):
        w = rotate(w, int(conf.get("convrot_groupsize", CONVROT_GROUP)))
    return w.reshape(shape)


def _params(conf: dict) -> dict:
    """The rotation settings: at the top level of a layer config, or under "params" (some writers)."""
    return conf.get("params") if isinstance(conf.get("params"), dict) else conf


class Int8(LayerFormat):
    """``int8``: row-wise INT8 after ConvRot (what ``to-comfy --format int8`` asks for)."""

    name = "int8"
    comfy_format = "int8_tensorwise"
    family = "int8"
    loads_in = "ComfyUI with int8_tensorwise and ConvRot (Jun 2026, #14636)"
    native_on = "INT8 matmuls from Turing (sm 7.5) on"
    weight_dtype = "I8"
    needs_multiple = CONVROT_GROUP
    mix_candidate = True
    in_demo = True
    per_row, convrot = True, True
    file_suffix = "int8-convrot"
    # ConvRot on a layer whose inputs its group does not divide: row-wise INT8 without the rotation, the
    # closest stock layout (NVFP4 and MXFP8 pad instead; ``convrot-w4a4`` has no fallback).
    fallback = "int8-row"

    def config(self):
        if self.convrot:
            return {"format": self.comfy_format, "convrot": True, "convrot_groupsize": CONVROT_GROUP}
        return {"format": self.comfy_format}

    def stored(self, shape):
        rows, cols = shape
        return [("weight", "I8", (rows, cols)), ("weight_scale", "F32", (rows, 1) if self.per_row else ())]

    def encode(self, w):
        return encode_int8(w, per_row=self.per_row, convrot=self.convrot)

    def decode(self, tensors, shape, conf):
        return decode_int8(tensors, shape, conf)

    def activations(self, x, conf, input_scale):
        params = _params(conf)
        return int8_rows(x, int(params.get("convrot_groupsize", CONVROT_GROUP)) if params.get("convrot") else 0)

    def _decoder(self, layer: StoredLayer, conf: dict, logical) -> Decoder:
        rows, cols = layer.meta["weight"].shape
        scale = layer.meta["weight_scale"]
        if scale.dtype != "F32" or tuple(scale.shape) not in ((), (rows, 1)):
            raise CheckpointError(f"{layer.where}: an int8 weight_scale must be F32 [] or [{rows}, 1], not "
                                  f"{scale.dtype} {list(scale.shape)} (a 1-D per-row scale would scale columns)")
        params = _params(conf)
        convrot = params.get("convrot", False)
        if not isinstance(convrot, bool):
            raise CheckpointError(f"{layer.where}: convrot must be true or false, not {untrusted.shown(convrot, 20)}")
        # the group matters (and must fit) only when the weight was rotated
        group = rotation_group(layer.where, params.get("convrot_groupsize", CONVROT_GROUP), cols) if convrot else 0
        s = nonnegative(layer.where, layer.read("weight_scale"))
        return lambda q: decode_int8({"weight": q, "weight_scale": s}, (rows, cols),
                                     {"convrot": convrot, "convrot_groupsize": group})


class Int8Row(Int8):
    """``int8-row``: row-wise INT8 without the rotation (ConvRot's fallback where 256 does not divide)."""

    name = "int8-row"
    needs_multiple = 1
    mix_candidate = in_demo = False  # the mix measures it only where ConvRot does not fit (``fitting``)
    per_row, convrot = True, False
    file_suffix = "int8-rowwise"
    fallback = None


class Int8Tensor(Int8):
    """``int8-tensor``: one scale for the whole weight."""

    name = "int8-tensor"
    needs_multiple = 1
    mix_candidate = in_demo = False
    per_row, convrot = False, False
    file_suffix = "int8-tensorwise"
    fallback = None


INT8_ROW = Int8Row()
