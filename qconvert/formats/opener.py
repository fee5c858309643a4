"""One opener for every file qconvert writes: what it is, and a weight source over it.

``detect`` names the kind of a path from its name and header alone; ``open_output`` returns a weight source
(``names()``, ``load(name)`` as float32 in diffusers' names) and a label for reports.  A source whose
format computes differently from its dequantized weights names its ``runtime`` (``"comfy"``,
``"svdquant"``, ``"bfl"``): the model-running layer has a provider for each (``running.providers.native_provider``).
inspect, verify and bake-lora all start here, so a new file kind is added in one place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qconvert.codecs.gguf.quants import dequantize
from qconvert.core.checkpoint import open_checkpoint, read_safetensors_header
from qconvert.core.errors import QConvertError
from qconvert.formats.bfl import BFLFile, is_bfl
from qconvert.formats.comfyui.loader import FP8File, fp8_layout
from qconvert.formats.gguf.reader import open_gguf
from qconvert.formats.svdquant.file import SVDQuantFile, is_svdquant


def detect(path) -> str:
    """``svdquant``, ``gguf``, ``safetensors`` (a single file: checkpoint or FP8/ComfyUI) or ``checkpoint``."""
    p = Path(path)
    if is_svdquant(p):
        return "svdquant"
    if p.is_file() and p.suffix.lower() == ".gguf":
        return "gguf"
    if p.is_file() and p.suffix.lower() == ".safetensors":
        return "safetensors"
    return "checkpoint"


def open_output(path) -> tuple[object, str]:
    """A weight source for any file qconvert writes, and what it is."""
    p = Path(path)
    kind = detect(p)
    if kind == "svdquant":
        f = SVDQuantFile(p)
        return f, f"svdquant-{f.options.layout}-{f.options.precision}-r{f.options.rank}"
    if kind == "gguf":
        return GGUFWeights(p), "gguf"
    if kind == "safetensors":
        layout = fp8_layout(p)
        if layout in ("plain", "none") and is_bfl(read_safetensors_header(p).tensors):
            f = BFLFile(p)
            return f, "diffusers-" + "+".join(f.formats())
        if layout == "comfy":
            weights = FP8Weights(p)  # every layer config and scale checked once, here
            return weights, "comfy-" + "+".join(weights.formats()) if weights.formats() else "comfy"
        if layout != "none":
            return FP8Weights(p), f"fp8-{layout}"
    return open_checkpoint(p), "checkpoint"


class GGUFWeights:
    """A GGUF file as a weight source: each tensor dequantized when asked for (gguf-py's decoders,
    which match ggml's), in torch's shape order.  Runs as dense weights."""

    def __init__(self, path):
        self.path = path
        self._tensors = {t.name: t for t in open_gguf(path).tensors}

    def names(self) -> list[str]:
        return list(self._tensors)

    def load(self, name: str) -> torch.Tensor:
        t = self._tensors.get(name)
        if t is None:
            raise QConvertError(f"{self.path}: no tensor {name}; not a whole Qwen-Image GGUF")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type, shape), dtype=np.float32))


class FP8Weights:
    """An FP8 safetensors file (any layout to-fp8 writes, or ComfyUI's) as a weight source: scaled
    weights dequantized with their checked scales, one tensor at a time (``fp8_loader.FP8File``)."""

    def __init__(self, path):
        self._file = FP8File(path)
        # ComfyUI-layout layers run natively (inputs quantized per layer); a legacy scaled file has no layer
        # configs, so it runs as dense weights either way
        self.runtime = "comfy"

    def names(self) -> list[str]:
        return self._file.names()

    def formats(self) -> list[str]:
        """The layer formats the file holds (``float8_e4m3fn``, ``nvfp4`` ...), sorted."""
        return self._file.formats()

    def load(self, name: str) -> torch.Tensor:
        return self._file.load(name).to(torch.float32)
