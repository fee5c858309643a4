"""ComfyUI's per-layer formats, by name: the one table the writer, the mix, the loader, verify's providers
and the CLI read.  A new format is its module (a ``LayerFormat``), one line here, and its tests."""

from __future__ import annotations

import torch

from qconvert.codecs.comfyui.base import LayerFormat
from qconvert.codecs.comfyui.layouts.awq import AwqW4A16
from qconvert.codecs.comfyui.layouts.fp8 import FP8, FP8_E5M2
from qconvert.codecs.comfyui.layouts.int8 import INT8_ROW, Int8, Int8Tensor
from qconvert.codecs.comfyui.layouts.mxfp8 import Mxfp8
from qconvert.codecs.comfyui.layouts.nvfp4 import Nvfp4
from qconvert.codecs.comfyui.layouts.w4a4 import ConvrotW4A4
from qconvert.codecs.comfyui.layouts.w4a8 import W4A8, W6A8

# In this order the mix tries its candidates (ties go to the first), and to-comfy lists its formats.
FORMATS: dict[str, LayerFormat] = {f.name: f for f in (
    FP8, Mxfp8(), Int8(), Nvfp4(), W4A8(), W6A8(), AwqW4A16(), INT8_ROW, Int8Tensor(), ConvrotW4A4(), FP8_E5M2)}
# ComfyUI's format string -> the format that decodes and runs it (every int8 layout reads the same)
BY_COMFY_FORMAT: dict[str, LayerFormat] = {}
for _f in FORMATS.values():
    BY_COMFY_FORMAT.setdefault(_f.comfy_format, _f)
BF16 = "bf16"  # a mix's "keep this layer in full precision"
# What the size-budgeted mix chooses from
MIX_CANDIDATES = (BF16, *(f.name for f in FORMATS.values() if f.mix_candidate))


def stored_suffixes() -> tuple[str, ...]:
    """Every name a format stores beside a layer's weight (``weight_scale``, ``weight_s_rel`` ...)."""
    return tuple(sorted({s for f in FORMATS.values() for s, _, _ in f.stored((256, 256)) if s != "weight"}))


def layer_format(name: str) -> LayerFormat:
    return FORMATS[name]


def roundtrip(w: torch.Tensor, name: str) -> torch.Tensor:
    """The weight as ComfyUI would use it after storing it in format ``name`` (or BF16)."""
    if name == BF16:
        return w.to(torch.bfloat16).float()
    return FORMATS[name].roundtrip(w)


def activations(x: torch.Tensor, comfy_format: str, conf: dict, input_scale: torch.Tensor | None) -> torch.Tensor:
    """The input as a native ComfyUI matmul of that layer quantizes it (spec comfy-quant.md §2.2), fake-quantized
    in float32; unchanged for a layer that asks for full precision or whose format has no native matmul."""
    x = x.float()
    if conf.get("full_precision_matrix_mult"):
        return x
    fmt = BY_COMFY_FORMAT.get(comfy_format)
    return x if fmt is None else fmt.activations(x, conf, input_scale)


RUNTIMES = ("native", "dequantized")


def as_run(w: torch.Tensor, name: str, runtime: str = "native"):
    """(the weight ComfyUI multiplies by after storing ``w`` in format ``name``, what its matmul does to the
    layer's input): under ``native`` the input is quantized as that format's native matmul quantizes it (none
    for BF16, or an FP8 layer asking for full precision); under ``dequantized`` it is left as it is."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}: choose {' or '.join(RUNTIMES)}")
    if name == BF16 or runtime == "dequantized":
        return roundtrip(w, name), None
    fmt = FORMATS[name]
    tensors, conf = fmt.encode(w)
    weight = fmt.decode(tensors, tuple(w.shape), conf)
    if conf.get("full_precision_matrix_mult"):
        return weight, None
    input_scale = tensors.get("input_scale")
    return weight, lambda x: activations(x, fmt.comfy_format, conf, input_scale).to(x.dtype)
