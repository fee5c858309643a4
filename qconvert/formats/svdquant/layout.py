"""Which tensors an SVDQuant file holds, with which shapes and dtypes, in each layout.

Two layouts of the same quantized block (spec svdquant.md §3):

* ``nunchaku``: what Nunchaku's ``NunchakuQwenImageTransformer2DModel`` and
  ComfyUI-nunchaku load strictly: q/k/v fused (``attn.to_qkv``,
  ``attn.add_qkv_proj``), ``smooth_factor_orig`` beside ``smooth_factor``,
  the INT4 MLP-down shifted, the modulation layers' outputs interleaved
  (6, D) → (D, 6) with the ``+1`` of ``1 + scale`` in their bias; NVFP4 α as
  ``wcscales`` (fused) or ``wtscale`` (single layers); no ``wcscales`` in
  INT4 files.
* ``diffusers``: what diffusers' ``nunchaku_lite`` quantizer builds over
  ``QwenImageTransformer2DModel``: every linear its own module (q, k, v
  unfused, sharing the fused search's smoothing and down factor), no
  shift (its linears quantize signed), modulation in diffusers' own order;
  NVFP4 modules carry both ``wcscales`` and ``wtscale``.

``module_tensors`` turns a ``LogicalLayer`` into the stored tensors and
``logical_layer`` reads them back, through ``packing.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconvert.codecs.svdquant import packing
from qconvert.codecs.svdquant.algorithm import LogicalLayer

LAYOUTS = ("nunchaku", "diffusers")
PRECISIONS = ("int4", "nvfp4")
MODULATION_CHUNKS = 6
# the +1 of (1 + scale) for chunks shift1, scale1, gate1, shift2, scale2, gate2
MODULATION_ONE = (0.0, 1.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class Group:
    """One quantized module of a block: ``name`` (as stored) computed from ``sources`` (diffusers names)."""

    name: str
    sources: tuple[str, ...]
    kind: str  # "svdq" | "awq"
    mlp_down: bool = False

    @property
    def fused(self) -> bool:
        return len(self.sources) > 1


GROUPS = (
    Group("attn.to_qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), "svdq"),
    Group("attn.add_qkv_proj", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "svdq"),
    Group("attn.to_out.0", ("attn.to_out.0",), "svdq"),
    Group("attn.to_add_out", ("attn.to_add_out",), "svdq"),
    Group("img_mlp.net.0.proj", ("img_mlp.net.0.proj",), "svdq"),
    Group("img_mlp.net.2", ("img_mlp.net.2",), "svdq", mlp_down=True),
    Group("txt_mlp.net.0.proj", ("txt_mlp.net.0.proj",), "svdq"),
    Group("txt_mlp.net.2", ("txt_mlp.net.2",), "svdq", mlp_down=True),
    Group("img_mod.1", ("img_mod.1",), "awq"),
    Group("txt_mod.1", ("txt_mod.1",), "awq"),
)
KEPT_BLOCK_TENSORS = ("attn.norm_q.weight", "attn.norm_k.weight", "attn.norm_added_q.weight",
                      "attn.norm_added_k.weight")


def group_of(module: str) -> Group:
    """The group computing a diffusers module (``attn.to_k`` -> ``attn.to_qkv``)."""
    return next(g for g in GROUPS if module in g.sources)


def stored_modules(layout: str) -> list[tuple[str, Group, int]]:
    """(stored module name, its group, which source it is) per block, in file order."""
    out = []
    for g in GROUPS:
        if layout == "diffusers" and g.fused:
            out += [(src, g, i) for i, src in enumerate(g.sources)]
        else:
            out.append((g.name, g, -1))
    return sorted(out)


def svdq_keys(layout: str, precision: str, fused: bool, n: int, k: int, rank: int) -> dict[str, tuple]:
    """suffix -> (dtype, shape) of one W4A4 module with ``n`` outputs, ``k`` inputs."""
    group = 16 if precision == "nvfp4" else 64
    keys = {"qweight": ("I8", (n, k // 2)), "bias": ("BF16", (n,)),
            "wscales": ("F8_E4M3" if precision == "nvfp4" else "BF16", (k // group, n)),
            "smooth_factor": ("BF16", (k,)), "proj_down": ("BF16", (k, rank)), "proj_up": ("BF16", (n, rank))}
    if layout == "nunchaku":
        keys["smooth_factor_orig"] = ("BF16", (k,))
        if precision == "nvfp4":
            keys["wcscales" if fused else "wtscale"] = ("BF16", (n,) if fused else (1,))
    elif precision == "nvfp4":
        keys["wcscales"] = ("BF16", (n,))
        keys["wtscale"] = ("BF16", (1,))
    return dict(sorted(keys.items()))


def awq_keys(n: int, k: int) -> dict[str, tuple]:
    return {"bias": ("BF16", (n,)), "qweight": ("I32", (n // 4, k // 2)), "wscales": ("BF16", (k // 64, n)),
            "wzeros": ("BF16", (k // 64, n))}


def block_entries(layout: str, precision: str, rank: int, shapes: dict, index: int) -> list[tuple[str, str, tuple]]:
    """Every (name, dtype, shape) of block ``index``; ``shapes`` maps diffusers names to torch shapes."""
    p = f"transformer_blocks.{index}."
    entries = []
    for stored, group, part in stored_modules(layout):
        sources = group.sources if part < 0 else (group.sources[part],)
        n = sum(shapes[p + s + ".weight"][0] for s in sources)
        k = shapes[p + sources[0] + ".weight"][1]
        keys = awq_keys(n, k) if group.kind == "awq" else svdq_keys(layout, precision, group.fused and part < 0,
                                                                      n, k, rank)
        entries += [(f"{p}{stored}.{suffix}", dtype, shape) for suffix, (dtype, shape) in keys.items()]
    entries += [(p + name, "BF16", shapes[p + name]) for name in KEPT_BLOCK_TENSORS]
    return sorted(entries)


# --------------------------------------------------------- pack / unpack

def module_tensors(layer: LogicalLayer, layout: str, fused: bool, rows: slice | None = None) -> dict[str, torch.Tensor]:
    """The stored tensors of one W4A4 module (``rows``: one part of a fused group, diffusers layout)."""
    rows = rows or slice(None)
    codes, scales = layer.codes[rows], layer.scales[rows]
    out = {"qweight": packing.pack_codes(codes.to(torch.int16)),
           "bias": packing.pack_vector(layer.bias[rows]),
           "smooth_factor": packing.pack_vector(layer.smooth),
           "proj_down": packing.pack_lowrank(layer.down, down=True),
           "proj_up": packing.pack_lowrank(layer.up[rows], down=False)}
    out["wscales"] = (packing.pack_micro_scales(scales) if layer.precision == "nvfp4"
                      else packing.pack_scales(scales))
    if layout == "nunchaku":
        out["smooth_factor_orig"] = out["smooth_factor"].clone()
    if layer.precision == "nvfp4":
        alpha = layer.alpha[rows]
        if layout == "nunchaku" and fused:
            out["wcscales"] = packing.pack_vector(alpha)
        else:
            if not bool((alpha == alpha[0]).all()):
                raise ValueError("a single NVFP4 module must have one α")
            out["wtscale"] = alpha[:1].clone()
            if layout == "diffusers":
                out["wcscales"] = torch.ones_like(alpha)
    return dict(sorted(out.items()))


def logical_layer(tensors: dict[str, torch.Tensor], precision: str, shift: float = 0.0) -> LogicalLayer:
    """A stored W4A4 module back in logical layout (what the emulator runs)."""
    n = tensors["qweight"].shape[0]
    codes = packing.unpack_codes(tensors["qweight"], signed=precision == "int4")
    if precision == "nvfp4":
        scales = packing.unpack_micro_scales(tensors["wscales"])
        alpha = torch.ones(n, dtype=torch.bfloat16)
        if "wcscales" in tensors:
            alpha = packing.unpack_vector(tensors["wcscales"])
        if "wtscale" in tensors:
            alpha = alpha * tensors["wtscale"].reshape(())
        codes = codes.to(torch.uint8)
    else:
        scales, alpha = packing.unpack_scales(tensors["wscales"]), None
    return LogicalLayer(precision, codes, scales, alpha, packing.unpack_vector(tensors["smooth_factor"]),
                        packing.unpack_lowrank(tensors["proj_down"], down=True),
                        packing.unpack_lowrank(tensors["proj_up"], down=False),
                        packing.unpack_vector(tensors["bias"]), shift)


def awq_tensors(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor,
                layout: str) -> dict[str, torch.Tensor]:
    """The stored tensors of a modulation layer (logical inputs in diffusers' output order)."""
    if layout == "nunchaku":  # Nunchaku reads the outputs channel-major and runs with scale_shift 0
        codes, scales, zeros = (packing.interleave_modulation(t) for t in (codes, scales, zeros))
        one = torch.tensor(MODULATION_ONE, dtype=torch.float32).repeat(bias.shape[0] // MODULATION_CHUNKS)
        bias = (packing.interleave_modulation(bias.float()) + one).to(torch.bfloat16)
    return {"bias": bias.to(torch.bfloat16), "qweight": packing.pack_awq(codes),
            "wscales": scales.T.contiguous(), "wzeros": zeros.T.contiguous()}


def awq_logical(tensors: dict[str, torch.Tensor], layout: str) -> tuple:
    """(dequantized weight [N, K] float32, bias [N]) in diffusers' output order and meaning."""
    from qconvert.codecs.svdquant.quant import awq_dequantize

    w = awq_dequantize(packing.unpack_awq(tensors["qweight"]), tensors["wscales"].T, tensors["wzeros"].T)
    bias = tensors["bias"].float()
    if layout == "nunchaku":
        one = torch.tensor(MODULATION_ONE).repeat(bias.shape[0] // MODULATION_CHUNKS)
        w = packing.deinterleave_modulation(w.T).T
        bias = packing.deinterleave_modulation(bias - one)
    return w, bias
