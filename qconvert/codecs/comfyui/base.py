"""What one ComfyUI per-layer format is (spec comfy-quant.md §2-§5): a small class per format.

A ``LayerFormat`` says everything qconvert needs of a format, in one place: its name (qconvert's, which the
CLI, recipes and mixes use) and ComfyUI's ``comfy_quant`` format string, the tensors it stores per layer
and their exact shapes, ``encode`` (comfy-kitchen's quantizer, byte for byte) and ``decode`` (ComfyUI's
dequantization), what a native matmul does to the layer's input (``activations``, for verify's emulation),
which ComfyUI loads it, and how a stored layer read from a file is checked before it is trusted.  The
writer, the mix, the loader, verify's providers and the CLI all read the registry (``registry.py``), so a
new format is its own module, one line in the registry, and its tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from qconvert.core import untrusted
from qconvert.core.errors import CheckpointError

Decoder = Callable[[torch.Tensor], torch.Tensor]
# ModelOpt's AWQ-style smoothing, per input channel: ComfyUI multiplies a layer's input by it before anything
# else (comfy/ops.py, ``MixedPrecisionOps.Linear.forward``), so the stored weight is the smoothed one,
# ``W[:, k] / pre_quant_scale[k]``.  Only formats whose ``QUANT_ALGOS`` entry lists it load it (nvfp4).
PRE_QUANT_SCALE = "pre_quant_scale"


@dataclass
class StoredLayer:
    """One quantized layer of a file, as a loader sees it before trusting it."""

    where: str  # "FILE: layer NAME", for errors
    meta: dict  # suffix ("weight", "weight_scale", ...) -> the header's tensor record, or None
    read: Callable[[str], torch.Tensor]  # suffix -> the stored tensor
    scalar: Callable[[str], torch.Tensor]  # suffix -> one checked finite, non-negative float


class LayerFormat:
    name: str  # qconvert's name: the CLI's --format choice, a mix's candidate, a recipe's value
    comfy_format: str  # ComfyUI's comfy_quant "format"
    family: str  # what ComfyUI support it needs (every int8 layout is "int8")
    loads_in: str  # the ComfyUI (and comfy-kitchen) that loads it
    native_on: str  # the GPUs whose matmuls run it natively
    weight_dtype: str  # the stored weight's safetensors dtype
    values_per_element: int = 1  # weight values in each stored weight element (two E2M1 or INT4 codes a byte)
    block: int = 0  # NVFP4 and MXFP8 zero-pad both dimensions to this (0: stored unpadded)
    needs_multiple: int = 1  # the inputs must be a multiple of this (a ConvRot group)
    fallback: str | None = None  # the format's name for layers whose inputs needs_multiple does not divide
    scale_suffixes: tuple = ("weight_scale",)  # what a stored layer must hold besides its weight
    mix_candidate: bool = False  # the size-budgeted mix may choose it
    in_to_comfy: bool = True  # to-comfy --format offers it (FP8 has to-fp8 and its layouts)
    in_demo: bool = False  # qconvert demo writes a file of it
    smoothable: bool = False  # ComfyUI loads and applies a ``pre_quant_scale`` for it
    smoothed_loads_in: str = ""  # the ComfyUI a smoothed layer needs (smoothable formats)

    @property
    def file_suffix(self) -> str:
        """What a whole file in this format is called after the model's name (``qwen-image-nvfp4``)."""
        return self.name

    @property
    def min_comfyui(self) -> str:
        """What a file in this format needs, as the converter says it after writing."""
        return f"{self.loads_in}; {self.native_on}"

    def config(self) -> dict:
        """The comfy_quant JSON object qconvert writes (stock ComfyUI's, never a custom node's)."""
        return {"format": self.comfy_format}

    def stored(self, shape: tuple) -> list[tuple[str, str, tuple]]:
        """(suffix, dtype, shape) of each tensor stored for a ``shape`` weight, besides ``comfy_quant``."""
        raise NotImplementedError

    def encode(self, w: torch.Tensor) -> tuple[dict, dict]:
        """The stored tensors (by suffix) and the comfy_quant object of weight ``w``."""
        raise NotImplementedError

    def decode(self, tensors: dict, shape: tuple, conf: dict) -> torch.Tensor:
        """ComfyUI's dequantization in float32, cropped to the module's ``shape``."""
        raise NotImplementedError

    def activations(self, x: torch.Tensor, conf: dict, input_scale: torch.Tensor | None) -> torch.Tensor:
        """The input as a native ComfyUI matmul quantizes it, fake-quantized in float32 (spec §2.2)."""
        return x

    def like_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Each input row quantized as this format quantizes a weight's row (dynamic activation scales)."""
        rows = x.reshape(-1, x.shape[-1])
        return self.roundtrip(rows).reshape(x.shape)

    def roundtrip(self, w: torch.Tensor) -> torch.Tensor:
        """The weight as ComfyUI uses it after storing it in this format."""
        tensors, conf = self.encode(w)
        return self.decode(tensors, tuple(w.shape), conf)

    def fitting(self, shape: tuple) -> str:
        """The format (by name) a layer of ``shape`` gets when this one is asked for: this one, or its
        ``fallback`` where ``needs_multiple`` does not divide the inputs (a ConvRot group that does not fit)."""
        return self.fallback if self.fallback and shape[1] % self.needs_multiple else self.name

    def stored_columns(self, meta) -> int:
        """The weight's inputs (padded, where the format pads) from a stored layer's header records
        (``meta``: suffix -> record with a ``shape``)."""
        return int(meta["weight"].shape[1]) * self.values_per_element

    def nbytes(self, shape: tuple) -> int:
        """Stored bytes of a ``shape`` layer (tensor data, without the comfy_quant bytes)."""
        from qconvert.core.checkpoint import DTYPES

        return sum(math.prod(s) * DTYPES[d][0] for _, d, s in self.stored(shape))

    # ------------------------------------------------------------- loading

    def decoder(self, layer: StoredLayer, conf: dict, logical: tuple | None) -> Decoder:
        """A checked stored layer: a function of its stored weight giving ComfyUI's float32 weight.
        ``logical`` is the module's ``(out, in)`` when known (a padded weight is cropped to it)."""
        w = layer.meta["weight"]
        if w is None or any(layer.meta.get(s) is None for s in self.scale_suffixes):
            *first, last = ("weight", *self.scale_suffixes)
            raise CheckpointError(f"{layer.where} is {self.comfy_format} but lacks {', '.join(first)} or {last}")
        if len(w.shape) != 2:
            raise CheckpointError(f"{layer.where}: the weight must be 2-D, not {list(w.shape)}")
        if w.dtype != self.weight_dtype:
            raise CheckpointError(f"{layer.where} says {self.comfy_format} but its weight is {w.dtype}, not "
                                  f"{self.weight_dtype}")
        return self._decoder(layer, conf, logical)

    def _decoder(self, layer: StoredLayer, conf: dict, logical: tuple | None) -> Decoder:
        raise NotImplementedError


# ------------------------------------------------------- shared helpers

def smoothed(w: torch.Tensor, pre_quant_scale: torch.Tensor) -> torch.Tensor:
    """The weight to store for a layer whose input ComfyUI multiplies by ``pre_quant_scale`` (float32)."""
    return w.float() / pre_quant_scale.float()


def unsmoothed(w: torch.Tensor, pre_quant_scale: torch.Tensor) -> torch.Tensor:
    """The dense weight a smoothed layer computes with: its decoded weight times the smoothing, per input."""
    return w * pre_quant_scale.float()


def nonnegative(where: str, scale: torch.Tensor) -> torch.Tensor:
    scale = scale.float()
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise CheckpointError(f"{where}: weight_scale holds negative or non-finite values")
    return scale


def _power_of_4(n: int) -> bool:
    while n % 4 == 0 and n > 1:
        n //= 4
    return n == 1


def rotation_group(where: str, group, cols: int) -> int:
    """A ConvRot group from a layer config: a power of 4 from 4 to 4096 dividing the inputs."""
    if type(group) is not int or not 4 <= group <= 4096 or not _power_of_4(group) or cols % group:
        raise CheckpointError(f"{where}: convrot group {untrusted.shown(group, 20)} must be a power of 4 "
                              f"dividing {cols}")
    return group
