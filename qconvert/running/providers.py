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

from qconvert.codecs import bfl
from qconvert.codecs.comfyui.registry import activations
from qconvert.core.errors import QuantizationError
from qconvert.core.pipeline import all_finite
from qconvert.formats.svdquant.file import ConfigShapes
from qconvert.formats.svdquant.plan import top_level_names

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
    inputs quantized per layer (``codecs.comfyui.registry.activations``); full-precision layers untouched.

    A smoothed layer (``pre_quant_scale``) quantizes its input times the smoothing, as ComfyUI does; the
    loader's dense weight has the smoothing folded in, so the quantized input is divided by it again
    (float32: exact to a rounding, which ComfyUI's BF16 product has too)."""

    def linear(self, module: str) -> Linear:
        dense = super().linear(module)
        config = self.source._file.layer_config(module)
        if config is None:
            return dense
        fmt, conf, input_scale, smoothing = config
        if smoothing is None:
            return lambda x: dense(activations(x, fmt, conf, input_scale).to(x.dtype))
        s = smoothing.to(self.device)
        return lambda x: dense((activations(x * s, fmt, conf, input_scale) / s).to(x.dtype))


class BFLProvider(DenseProvider):
    """A diffusers fp8r/nvfp4 file run as diffusers' native matmuls run it (fp8r on RTX 40+, nvfp4 on Blackwell
    with FlashInfer): weights dequantized, each quantized layer's input quantized as its matmul does."""

    def linear(self, module: str) -> Linear:
        dense = super().linear(module)
        found = self.source.layer_tensors(module, scales_only=True)
        if found is None:
            return dense
        fmt, tensors = found
        return lambda x: dense(bfl.inputs(fmt, x, tensors).to(x.dtype))


class SVDQuantProvider:
    """The reference model's weights from an SVDQuant file, computed as the runtime computes them."""

    def __init__(self, file, *, dtype: torch.dtype = torch.float32, device="cpu"):
        self.file = file
        self.dtype = dtype
        self.device = torch.device(device)
        self._top = set(top_level_names(ConfigShapes(file.config)))

    def tensor(self, name: str) -> torch.Tensor:
        return self.file._read(name).to(self.device, self.dtype)

    def linear(self, module: str):
        if f"{module}.weight" in self._top:
            w, b = self.tensor(f"{module}.weight"), self.tensor(f"{module}.bias")
            return lambda x: F.linear(x, w, b)
        block, stored, group, rows = self.file._where(module)
        value = self.file._layer(block, stored, group)
        if group.kind == "awq":  # W4A16: weights dequantized, activations kept
            w, b = (t[rows].to(self.device, self.dtype) for t in value)
            return lambda x: F.linear(x, w, b)
        fused = self._runner(block, stored, value)
        return lambda x: fused(x)[..., rows].to(x.dtype)

    def _runner(self, block: int, stored: str, value):
        """The stored module's emulation, memoized on its last input: the fused q, k and v share one
        input, so the fused layer runs once for the three."""
        key = ("run", block, stored)
        runner = self.file._cache["layers"].get(key)
        if runner is None:
            layer, r = value
            layer = layer.copy(**{k: v.to(self.device) for k, v in vars(layer).items()
                                  if isinstance(v, torch.Tensor) and k != "dequantized"})
            r = r.to(self.device)
            memo: dict = {}

            def runner(x: torch.Tensor) -> torch.Tensor:
                if memo.get("x") is not x:
                    memo["x"], memo["y"] = x, layer(x, r)
                return memo["y"]

            self.file._cache["layers"][key] = runner
        return runner


# How each weight source's ``runtime`` computes (``opener``): a provider that runs it so.
NATIVE_PROVIDERS = {"comfy": ComfyProvider, "svdquant": SVDQuantProvider, "bfl": BFLProvider}


def native_provider(source, *, dtype: torch.dtype = torch.float32, device="cpu", cache_bytes: int = 0):
    """The provider computing ``source`` as its native runtime does, or None when it runs as dense weights."""
    kind = NATIVE_PROVIDERS.get(getattr(source, "runtime", None))
    if kind is None:
        return None
    if kind is SVDQuantProvider:  # the file keeps its own cache of decoded layers
        return kind(source, dtype=dtype, device=device)
    return kind(source, dtype=dtype, device=device, cache_bytes=cache_bytes)


class FiniteOutputs:
    """A provider whose linears refuse to turn finite inputs into NaN/Inf, naming the layer: a damaged file
    (NaN scales, zero smoothing factors) fails verify where it breaks instead of giving NaN figures.  One
    ``aminmax`` pass over each output, small beside the matmul."""

    def __init__(self, inner, label: str):
        self.inner, self.label = inner, label

    def tensor(self, name: str) -> torch.Tensor:
        return self.inner.tensor(name)

    def linear(self, module: str) -> Linear:
        run = self.inner.linear(module)

        def checked(x: torch.Tensor) -> torch.Tensor:
            y = run(x)
            if y.numel() and not all_finite(y) and all_finite(x):
                raise QuantizationError(f"{self.label}: layer {module} turns finite inputs into NaN/Inf as the "
                                        "runtime computes it (damaged weights, scales or smoothing factors); the "
                                        "file fails verify")
            return y
        return checked

    def __getattr__(self, name: str):  # cache figures and the like belong to the inner provider
        return getattr(self.inner, name)
