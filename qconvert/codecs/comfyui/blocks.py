"""The math ComfyUI's block formats share: zero padding to a block, cuBLAS' scale swizzle, ConvRot's rotation.

Byte parity with comfy-kitchen 0.2.40 is tested (f32 math in its op order).  Guards (spec §7.5): NVFP4 and
MXFP8 pad an unaligned weight with zeros in both dimensions (to 16 or 32), as comfy-kitchen does; the stored
weight is the padded one and ComfyUI crops to its module's ``(out, in)``, so every decoder takes that logical
shape.  ConvRot needs its group to divide the inputs (every Qwen-Image linear does).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from qconvert.codecs.comfyui.base import Decoder, LayerFormat, StoredLayer
from qconvert.core.errors import CheckpointError

FP8_MAX = 448.0
CONVROT_GROUP = 256


def check_width(w: torch.Tensor, block: int, what: str) -> None:
    if w.dim() != 2 or w.shape[1] % block:
        raise ValueError(f"{what}: a [{', '.join(map(str, w.shape))}] weight; inputs must be a multiple of {block}")


def padded_shape(shape: tuple, block: int) -> tuple:
    """comfy-kitchen's ``pad_16x``/``pad_32x``: both dimensions up to multiples of ``block``."""
    return tuple(-(-int(n) // block) * block for n in shape)


def padded(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"a {x.dim()}-D weight; ComfyUI's block formats are 2-D")
    shape = padded_shape(x.shape, block)
    if shape == tuple(x.shape):
        return x
    out = x.new_zeros(shape)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def scale_grid(rows: int, cols: int, block: int) -> tuple:
    """The swizzled scale tensor's shape for a ``rows`` x ``cols`` weight with one scale per ``block``."""
    return 128 * -(-rows // 128), 4 * -(-(cols // block) // 4)


# ----------------------------------------------------------- the swizzle

def to_blocked(s: torch.Tensor) -> torch.Tensor:
    """cuBLAS' block-scaling layout: scales [R, Cb] -> [128·⌈R/128⌉, 4·⌈Cb/4⌉], zero-padded, each
    128x4 tile stored as 32 rows of 16 (row r%32, then the four 32-row quarters, then 4 columns)."""
    r, cb = s.shape
    rp, cp = 128 * math.ceil(r / 128), 4 * math.ceil(cb / 4)
    padded = s.new_zeros(rp, cp)
    padded[:r, :cb] = s
    tiles = padded.view(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(rp, cp)


def from_blocked(b: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    rp, cp = b.shape
    tiles = b.reshape(rp // 128, cp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(rp, cp)[:rows, :cols]


def hadamard(g: int) -> torch.Tensor:
    """ConvRot's rotation: H4^{⊗log4 g} / √g, symmetric and orthogonal (its own inverse)."""
    if g < 4 or 4 ** round(math.log(g, 4)) != g:
        raise ValueError(f"convrot group {g} is not a power of 4")
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float32)
    h = h4
    while h.shape[0] < g:
        h = torch.kron(h, h4)
    return h / math.sqrt(g)


def rotate(w: torch.Tensor, group: int) -> torch.Tensor:
    """Each ``group`` inputs of every row times Hᵀ (= H), in float32."""
    x = w.float().reshape(w.shape[0], -1, group)
    return (x @ hadamard(group).to(x.device).T).reshape(w.shape)


def int8_rows(x: torch.Tensor, group: int) -> torch.Tensor:
    """What ComfyUI's INT8 matmul does to its input, fake-quantized in float32: each row rotated (``group``
    > 0: ConvRot), quantized to INT8 with its own scale (amax / 127), decoded and rotated back."""
    rows = x.float().reshape(-1, x.shape[-1])
    if group:
        rows = rotate(rows, group)
    scale = torch.clamp(rows.abs().amax(dim=1, keepdim=True) / 127, min=1e-30)
    rows = torch.clamp(torch.round(rows / scale), -128, 127) * scale
    return (rotate(rows, group) if group else rows).reshape(x.shape)


def check_block_scale(layer, fmt: str, block: int, rows: int, cols: int,
                      logical: tuple | None) -> tuple:
    """The swizzled scale grid of a block format, checked; the weight's logical shape (cropped to the
    module's when known: a weight is stored zero-padded to the block)."""
    scale = layer.meta["weight_scale"]
    grid = scale_grid(rows, cols, block)
    if cols % block or tuple(scale.shape) != grid or scale.dtype not in ("U8", "F8_E4M3"):
        raise CheckpointError(f"{layer.where}: weight_scale is {scale.dtype} {list(scale.shape)}; a {fmt} weight of "
                              f"{rows}x{cols} needs an 8-bit {list(grid)} block grid")
    if logical is None:
        return rows, cols
    if padded_shape(logical, block) != (rows, cols):
        raise CheckpointError(f"{layer.where}: a {fmt} weight of {rows}x{cols} does not hold the module's "
                              f"{logical[0]}x{logical[1]} (padded to {block}, it would be "
                              f"{'x'.join(map(str, padded_shape(logical, block)))})")
    return tuple(logical)


class BlockScaled(LayerFormat):
    """A block-scaled format (NVFP4, MXFP8): its tensor math is two functions of the weight alone, a stored
    layer is its weight plus a swizzled 8-bit scale grid (and per-tensor scalars), and its native matmul
    quantizes each input row as it quantizes a weight row."""

    quantize: Callable  # staticmethod: weight -> (stored tensors, comfy_quant object)
    dequantize: Callable  # staticmethod: (stored tensors, logical shape) -> float32 weight

    def encode(self, w):
        return self.quantize(w)

    def decode(self, tensors, shape, conf):
        return self.dequantize(tensors, shape)

    def activations(self, x, conf, input_scale):
        return self.like_weights(x)

    def _decoder(self, layer: StoredLayer, conf: dict, logical) -> Decoder:
        rows, cols = layer.meta["weight"].shape[0], self.stored_columns(layer.meta)
        shape = check_block_scale(layer, self.comfy_format, self.block, rows, cols, logical)
        scalars = {s: layer.scalar(s) for s, _, dims in self.stored((rows, cols)) if dims == ()}
        return lambda q: self.dequantize({"weight": q, "weight_scale": layer.read("weight_scale"), **scalars}, shape)
