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
    """Weights from a checkpoint (or a LoRA view over one): ``F.linear`` in the compute dtype."""

    def __init__(self, source, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.source = source
        self.dtype = dtype
        self.device = torch.device(device)

    def tensor(self, name: str) -> torch.Tensor:
        return self.source.load(name).to(device=self.device, dtype=self.dtype)

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
