"""Weight providers: where the reference model's layers get their weights.

The model (``verify/model.py``) never reads a file.  For every linear layer
it asks a provider for a *function* ``x -> y``; for norms and embeddings, for
a tensor.  A dense provider returns ``F.linear`` over the source's weights; a
quantized format's provider returns the same function over dequantized
weights, or one that also quantizes the activations as the runtime does
(SVDQuant, FP8 with an input scale).  A new output format is a new provider,
never a branch in the model.

A provider hands out one block's layers at a time (``block(i)``): the model
drops them once the block has run, so peak memory is one block, whatever the
number of blocks.
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol

import torch
import torch.nn.functional as F

Linear = Callable[[torch.Tensor], torch.Tensor]


class WeightProvider(Protocol):
    """What the reference model needs from a weight source."""

    def tensor(self, name: str) -> torch.Tensor:
        """A norm weight, an embedding table, a bias: ``name`` as in the diffusers state dict."""

    def linear(self, module: str) -> Linear:
        """The function computing ``module`` (``transformer_blocks.3.attn.to_q``) on its input."""


class DenseProvider:
    """Weights from a checkpoint (or a LoRA view over one): ``F.linear`` in the compute dtype.

    ``cache_bytes``: converted tensors are kept, first come first kept, until
    that many bytes are held; the rest are read again at every step.
    Sampling visits the blocks in the same order at every step, so an
    evicting cache (LRU) would miss every time once the model does not fit;
    keeping the first blocks makes each cached byte save a read per step.
    0 (the default) keeps nothing: peak memory is one block.
    """

    def __init__(self, source, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 cache_bytes: int = 0):
        self.source = source
        self.dtype = dtype
        self.device = torch.device(device)
        self.cache_bytes = cache_bytes
        self.cached_bytes = 0
        self._cache: dict[str, torch.Tensor] = {}

    def tensor(self, name: str) -> torch.Tensor:
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        t = self.source.load(name).to(device=self.device, dtype=self.dtype)
        size = t.numel() * t.element_size()
        if self.cached_bytes + size <= self.cache_bytes:
            self._cache[name] = t
            self.cached_bytes += size
        return t

    def linear(self, module: str) -> Linear:
        weight = self.tensor(f"{module}.weight")
        bias = self.tensor(f"{module}.bias")
        return lambda x: F.linear(x, weight, bias)


class GGUFWeights:
    """A GGUF file as a weight source: each tensor dequantized when asked for (gguf-py's decoders,
    which match ggml's), in torch's shape order.  Use as ``DenseProvider(GGUFWeights(path))``."""

    def __init__(self, path):
        from ..formats.gguf.reader import open_gguf

        self.path = path
        self._tensors = {t.name: t for t in open_gguf(path).tensors}

    def names(self) -> list[str]:
        return list(self._tensors)

    def load(self, name: str) -> torch.Tensor:
        import numpy as np

        from ..errors import QConvertError
        from ..formats.gguf.quants import dequantize

        t = self._tensors.get(name)
        if t is None:
            raise QConvertError(f"{self.path}: no tensor {name}; not a whole Qwen-Image GGUF")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type, shape), dtype=np.float32))


class FP8Weights:
    """An FP8 safetensors file (any layout to-fp8 writes, or ComfyUI's) as a weight source: scaled
    weights dequantized with their checked scales, one tensor at a time (``fp8_loader.FP8File``)."""

    def __init__(self, path):
        from ..formats.fp8_loader import FP8File

        self._file = FP8File(path)

    def names(self) -> list[str]:
        return self._file.names()

    def formats(self) -> list[str]:
        """The layer formats the file holds (``float8_e4m3fn``, ``nvfp4`` ...), sorted."""
        return self._file.formats()

    def provider(self, *, dtype: torch.dtype = torch.float32, device="cpu", cache_bytes: int = 0):
        """Dequantized weights, and each ComfyUI-layout layer's input quantized as a native matmul would."""
        return ComfyProvider(self, dtype=dtype, device=device, cache_bytes=cache_bytes)

    def load(self, name: str) -> torch.Tensor:
        return self._file.load(name).to(torch.float32)


class StateDictProvider(DenseProvider):
    """Weights from an in-memory state dict (tests, and formats that dequantize whole files)."""

    def __init__(self, state: Mapping[str, torch.Tensor], **kwargs):
        super().__init__(_Loader(state), **kwargs)


class _Loader:
    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = state

    def load(self, name: str) -> torch.Tensor:
        return self.state[name]


class ComfyProvider(DenseProvider):
    """A ComfyUI file run as ComfyUI's native matmuls run it (on a GPU that has them): weights dequantized,
    inputs quantized per layer (``comfy_codecs.activations``); full-precision layers untouched."""

    def linear(self, module: str) -> Linear:
        from ..formats.comfy_codecs import activations

        dense = super().linear(module)
        config = self.source._file.layer_config(module)
        if config is None:
            return dense
        fmt, conf, input_scale = config
        return lambda x: dense(activations(x, fmt, conf, input_scale).to(x.dtype))

