"""``awq_w4a16``: 4-bit weights with a BF16 scale and zero point per 64 inputs of each output; activations stay
BF16 (weight-only).  ComfyUI registers it at Comfy-Org/ComfyUI 0271a469 (``TensorCoreAWQW4A16Layout`` of
comfy-kitchen 0.2.40, which has no quantizer: files come from an offline pipeline, here this module).

Stored, per layer (comfy-kitchen's ``tensor/awq_w4a16.py``, ComfyUI's ``_load_quantized_module``):

- ``weight``        I8 ``[N, K/2]``: unsigned 4-bit codes, column ``2j`` in bits 0-3, ``2j+1`` in bits 4-7;
- ``weight_scale``  BF16 ``[K/G, N]`` (transposed: one row per input group);
- ``weight_zeros``  BF16 ``[K/G, N]``;
- ``comfy_quant``   ``{"format": "awq_w4a16", "group_size": 64}``.

``W[n, k] = (code - 8) · scale[k // G, n] + zeros[k // G, n]``.  The quantizer is round-to-nearest over each
group's range: ``scale = (max - min) / 15`` and ``zeros = min + 8 · scale``, both rounded to BF16 first (the
codes are fitted to the stored values), so code 0 is the group's minimum and 15 its maximum.
"""

from __future__ import annotations

import torch

from qconvert.codecs.comfyui.base import Decoder, LayerFormat, StoredLayer
from qconvert.core import untrusted
from qconvert.core.errors import CheckpointError

AWQ_GROUP = 64
_SCALE_TYPES = ("BF16", "F16", "F32")


def encode_awq(w: torch.Tensor, group: int = AWQ_GROUP) -> tuple[dict, dict]:
    rows, cols = w.shape
    if cols % group:
        raise ValueError(f"awq_w4a16: {cols} inputs are not a multiple of its group of {group}")
    g = w.float().reshape(rows, cols // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).to(torch.bfloat16)
    zeros = (lo + 8 * scale.float()).to(torch.bfloat16)
    s = scale.float().unsqueeze(-1)
    steps = torch.where(s > 0, (g - zeros.float().unsqueeze(-1)) / torch.where(s > 0, s, torch.ones_like(s)), 0.0)
    codes = torch.clamp(torch.round(steps) + 8, 0, 15).to(torch.uint8).reshape(rows, cols)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    tensors = {"weight": packed, "weight_scale": scale.T.contiguous(), "weight_zeros": zeros.T.contiguous()}
    return tensors, {"format": "awq_w4a16", "group_size": group}


def decode_awq(tensors: dict, shape: tuple, group: int = AWQ_GROUP) -> torch.Tensor:
    """The weight, of ``shape`` (stored unpadded: the inputs are whole groups)."""
    packed = tensors["weight"].view(torch.uint8)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1).float()
    rows, cols = codes.shape
    scale = tensors["weight_scale"].float().T.unsqueeze(-1)
    zeros = tensors["weight_zeros"].float().T.unsqueeze(-1)
    return ((codes.reshape(rows, cols // group, group) - 8) * scale + zeros).reshape(shape)


class AwqW4A16(LayerFormat):
    name = "awq-w4a16"
    comfy_format = family = "awq_w4a16"
    loads_in = "ComfyUI with awq_w4a16 (Comfy-Org/ComfyUI at 0271a469) and comfy-kitchen 0.2.40"
    native_on = ("weight-only: BF16 activations on every GPU; comfy-kitchen's fused CUDA kernel serves up to 256 "
                 "rows (the modulation layers), larger inputs dequantize to BF16 first")
    weight_dtype = "I8"
    values_per_element = 2
    needs_multiple = AWQ_GROUP
    scale_suffixes = ("weight_scale", "weight_zeros")

    def config(self):
        return {"format": self.comfy_format, "group_size": AWQ_GROUP}

    def stored(self, shape):
        rows, cols = shape
        return [("weight", "I8", (rows, cols // 2)), ("weight_scale", "BF16", (cols // AWQ_GROUP, rows)),
                ("weight_zeros", "BF16", (cols // AWQ_GROUP, rows))]

    def encode(self, w):
        return encode_awq(w)

    def decode(self, tensors, shape, conf):
        return decode_awq(tensors, shape, int(conf.get("group_size", AWQ_GROUP)))

    def _decoder(self, layer: StoredLayer, conf: dict, logical) -> Decoder:
        rows, half = layer.meta["weight"].shape
        cols = 2 * half
        group = conf.get("group_size", AWQ_GROUP)  # ComfyUI's default when the config omits it
        if type(group) is not int or not 2 <= group <= cols or cols % group or group % 2:
            raise CheckpointError(f"{layer.where}: group_size {untrusted.shown(group, 20)} must be an even number "
                                  f"dividing the {cols} inputs")
        tensors = {}
        for suffix in self.scale_suffixes:
            meta = layer.meta[suffix]
            if meta.dtype not in _SCALE_TYPES or tuple(meta.shape) != (cols // group, rows):
                raise CheckpointError(f"{layer.where}: {suffix} is {meta.dtype} {list(meta.shape)}; a {rows}x{cols} "
                                      f"awq_w4a16 weight with groups of {group} needs a float "
                                      f"[{cols // group}, {rows}]")
            tensors[suffix] = layer.read(suffix).float()
            if not bool(torch.isfinite(tensors[suffix]).all()):
                raise CheckpointError(f"{layer.where}: {suffix} holds non-finite values")
        shape = (rows, cols) if logical is None else tuple(logical)
        if shape != (rows, cols):
            raise CheckpointError(f"{layer.where}: an awq_w4a16 weight of {rows}x{cols} does not hold the module's "
                                  f"{shape[0]}x{shape[1]}")
        return lambda q: decode_awq({"weight": q, **tensors}, shape, group)
