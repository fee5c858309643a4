"""``qconvert to-comfy``: ComfyUI's per-layer formats NVFP4, MXFP8 and INT8 (± ConvRot), streamed.

Every quantized linear ``L`` gets its format's tensors (``codecs.comfyui.registry``) and
``L.comfy_quant``, the UTF-8 JSON ComfyUI's loader parses
(``json.dumps`` defaults, as ComfyUI saves it); everything else is BF16, so
formats mix per layer (spec comfy-quant.md §2).  FP8 goes through ``to-fp8``
(``--format fp8`` here calls it).

Layer policy (spec §4.1): comfy-quants' lists: every block linear but
``transformer_blocks.0.img_mod.1`` (839) for NVFP4 and MXFP8, all 840 for
INT8; ``--keep GROUP`` keeps more in BF16.

Smoothing (``options.smoothing``, ``to-comfy --smooth``): an NVFP4 layer may store a BF16
``pre_quant_scale`` of its inputs, which ComfyUI multiplies the input by, and the weight
divided by it; ``running.smoothing`` chooses the factors, this module only stores them.

File order: by element size, then name, as the safetensors library writes;
F32 scales therefore precede their weights and are written as placeholders,
filled once the weight is encoded, so the source is read once, tensor by
tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from qconvert.codecs.comfyui import registry
from qconvert.codecs.comfyui.base import PRE_QUANT_SCALE, smoothed
from qconvert.core.checkpoint import DTYPES
from qconvert.core.derived import write_derived_safetensors
from qconvert.core.errors import QConvertError
from qconvert.core.io import atomic_output, safetensors_size, safetensors_target
from qconvert.core.models import qwen_image as qi
from qconvert.core.pipeline import parse_device, provenance, provenance_json

# to-comfy's own formats (FP8 files come from to-fp8, whose comfy layout --format fp8 asks for)
FORMATS = tuple(f.name for f in registry.FORMATS.values() if f.in_to_comfy)
FIRST_MODULATION = "transformer_blocks.0.img_mod.1"  # comfy-quants keeps it BF16 in every FP format
HIGH = "BF16"
Smoother = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ComfyOptions:
    fmt: str = "nvfp4"  # one format for the policy's layers, or "mix": the formats in ``mix``
    keep: tuple = ()
    mix: tuple = ()  # ((layer, format or "bf16"), ...) for fmt "mix" (comfy_mix.choose makes it)
    chosen_for: str = ""  # mix: the runtime its formats were measured under (native or dequantized)
    candidates: tuple = ()  # mix: the formats it chose among, when not all of them (--candidates)
    smoothing: tuple = ()  # ((key, value), ...): how each smoothable layer's pre_quant_scale was chosen; () none

    def kept_roles(self) -> frozenset:
        return frozenset().union(*(qi.ROLE_GROUPS[g] for g in self.keep))

    def to_json(self) -> dict:
        out = {"format": self.fmt, "keep": list(self.keep)}
        if self.fmt == "mix":
            counts: dict = {}
            for _, f in self.mix:
                counts[f] = counts.get(f, 0) + 1
            out["layers"] = dict(sorted(counts.items()))
            if self.chosen_for:
                out["chosen_for_runtime"] = self.chosen_for
            if self.candidates:
                out["candidates"] = list(self.candidates)
        if self.smoothing:
            out["smoothing"] = dict(self.smoothing)
        return out

    def formats(self) -> set:
        return {f for _, f in self.mix if f != "bf16"} if self.fmt == "mix" else {self.fmt}

    @property
    def family(self) -> str:
        return "+".join(sorted({_family(f) for f in self.formats()}))


def _family(fmt: str) -> str:
    return registry.layer_format(fmt).family


def make_options(fmt: str, keep=()) -> ComfyOptions:
    if fmt not in FORMATS:
        raise QConvertError(f"--format {fmt}: choose {', '.join(FORMATS)} (FP8: qconvert to-fp8)")
    return ComfyOptions(fmt, qi.parse_role_groups(keep))


def quantized_layers(source, options: ComfyOptions) -> dict[str, str]:
    """Layer -> its format, for every layer stored quantized."""
    if options.fmt == "mix":
        return {layer: f for layer, f in options.mix if f != "bf16"}
    kept = options.kept_roles()
    out = []
    for name in source.tensors:
        if not qi.is_known(name):
            continue
        info = qi.describe(name)
        if not info.is_block_linear or info.role in kept:
            continue
        if info.module == FIRST_MODULATION and options.family != "int8":
            continue
        out.append(info.module)
    return {layer: fitting(options.fmt, source.tensors[f"{layer}.weight"].shape) for layer in sorted(out)}


def fitting(fmt: str, shape) -> str:
    """The format a layer of ``shape`` gets when ``fmt`` is asked for (ConvRot INT8 falls back to row-wise
    INT8 where its group does not divide the inputs; NVFP4 and MXFP8 pad instead)."""
    return fmt if fmt == registry.BF16 else registry.layer_format(fmt).fitting(tuple(shape))


# -------------------------------------------------------------------- plan

def layer_entries(layer: str, shape: tuple, fmt: str, smooth: bool = False) -> list[tuple[str, str, tuple]]:
    """The stored (name, dtype, shape) of one quantized layer, from its weight's shape alone (``smooth``: with
    a BF16 ``pre_quant_scale`` of its inputs, where the format takes one)."""
    smoothing = [(f"{layer}.{PRE_QUANT_SCALE}", HIGH, (shape[1],))] if smooth and smoothed_format(fmt) else []
    return [(f"{layer}.comfy_quant", "U8", (len(_json(fmt)),))] + smoothing + [
        (f"{layer}.{suffix}", dtype, tuple(s)) for suffix, dtype, s in registry.layer_format(fmt).stored(shape)]


def smoothed_format(fmt: str) -> bool:
    return fmt != registry.BF16 and registry.layer_format(fmt).smoothable


def _json(fmt: str) -> bytes:
    """The stock ComfyUI JSON (never the INT8-Fast node's, which has no "format" and stock ComfyUI refuses)."""
    return json.dumps(registry.layer_format(fmt).config()).encode("utf-8")


def check_shapes(source, layers: dict[str, str]) -> None:
    for layer, fmt in layers.items():
        need = registry.layer_format(fmt).needs_multiple
        cols = source.tensors[f"{layer}.weight"].shape[1]
        if cols % need:
            raise QConvertError(f"{layer}: {cols} inputs are not a multiple of {need}, which {fmt} needs "
                                "(every Qwen-Image linear is; choose int8, which falls back to row-wise "
                                f"INT8 there, or a tiny model with --heads x --head-dim a multiple of {need})")


def plan(source, options: ComfyOptions, *, dry_run: bool = False) -> tuple[list, dict, set]:
    layers = quantized_layers(source, options)
    check_shapes(source, layers)
    weights = {f"{layer}.weight": fmt for layer, fmt in layers.items()}
    entries = []
    for name, meta in source.tensors.items():
        if name in weights:
            entries += layer_entries(name[: -len(".weight")], tuple(meta.shape), weights[name],
                                     bool(options.smoothing))
        elif not qi.is_known(name) or qi.describe(name).role is qi.Role.MARKER:
            entries.append((name, meta.dtype, tuple(meta.shape)))
        else:
            entries.append((name, HIGH, tuple(meta.shape)))
    if source.config.zero_cond_t and qi.MARKER_EDIT_2511 not in source.tensors:
        entries.append((qi.MARKER_EDIT_2511, HIGH, (0,)))
    entries.sort(key=lambda e: (-DTYPES[e[1]][0], e[0]))
    info = provenance(source, fmt=f"safetensors-comfy-{options.fmt}", options=options.to_json(), dry_run=dry_run)
    return entries, {"qconvert": provenance_json(info)}, weights


# ------------------------------------------------------------------ write

def write(source, options: ComfyOptions, target: Path, *, device="cpu", quiet: bool = False,
          smoother: Smoother | None = None) -> dict:
    """``smoother(layer, weight)``: the BF16 ``pre_quant_scale`` of each smoothable layer, when
    ``options.smoothing`` asks for one (``running.smoothing`` measures it)."""
    if bool(options.smoothing) != (smoother is not None):
        raise ValueError("options.smoothing and a smoother come together")
    entries, meta, weights = plan(source, options)
    dev = parse_device(device)
    dtypes = {name: dtype for name, dtype, _ in entries}
    derived = {name: f"{name.rpartition('.')[0]}.weight" for name, _, _ in entries
               if name not in source.tensors and f"{name.rpartition('.')[0]}.weight" in weights
               and not name.endswith(".comfy_quant")}

    def encode(name: str, tensor: torch.Tensor) -> dict:
        if name in weights:
            layer, w, extra = name[: -len(".weight")], tensor.to(dev), {}
            if smoother is not None and smoothed_format(weights[name]):
                factor = smoother(layer, w).to(torch.bfloat16)
                w, extra = smoothed(w, factor.to(dev)), {f"{layer}.{PRE_QUANT_SCALE}": factor}
            encoded, _ = registry.layer_format(weights[name]).encode(w)
            return {name: encoded.pop("weight"), **{f"{layer}.{s}": v for s, v in encoded.items()}, **extra}
        return {name: tensor.to(torch.bfloat16) if dtypes[name] == HIGH else tensor}

    def constant(name: str, dtype: str, shape: tuple) -> torch.Tensor:
        layer = name[: -len(".comfy_quant")]
        if name.endswith(".comfy_quant") and f"{layer}.weight" in weights:
            return torch.frombuffer(bytearray(_json(weights[f"{layer}.weight"])), dtype=torch.uint8)
        return torch.zeros(shape, dtype=DTYPES[dtype][1])  # the Edit-2511 marker a diffusers source signals

    with atomic_output(target, expected_bytes=safetensors_size(entries, meta)) as f:
        write_derived_safetensors(f, entries, meta, source, derived, encode, constant, desc=f"to-comfy {target.name}",
                                  quiet=quiet)
    return {"entries": entries, "layers": len(weights)}


# -------------------------------------------------------------- front end

def default_name(source, options: ComfyOptions) -> str:
    suffix = "comfy-mix" if options.fmt == "mix" else registry.layer_format(options.fmt).file_suffix
    return f"{source.name}-{suffix}.safetensors"


def output_path(source, options: ComfyOptions, output) -> Path:
    return safetensors_target(output, default_name(source, options), getattr(source, "path", None))


def convert(source, output=None, options: ComfyOptions = ComfyOptions(), *, device: str = "cpu",
            dry_run: bool = False, quiet: bool = False, smoother: Smoother | None = None) -> dict:
    target = output_path(source, options, output)
    entries, meta, weights = plan(source, options, dry_run=dry_run)
    # layers ConvRot's group does not fit, which get row-wise INT8 instead (int8's and w4a8's fallback)
    unrotated = sorted(w[: -len(".weight")] for w, f in weights.items()
                       if f == "int8-row" and options.fmt not in ("int8-row", "mix"))
    result = {"command": "to-comfy", "output": str(target), "format": options.fmt, "keep": list(options.keep),
              "layers": len(weights), "unrotated": unrotated, "tensor_count": len(entries),
              "bytes": safetensors_size(entries, meta),
              "written": False, "needs": needs(options.formats(), smoothed=bool(options.smoothing))}
    if dry_run:
        return result
    write(source, options, target, device=device, quiet=quiet, smoother=smoother)
    size = target.stat().st_size
    if size != result["bytes"]:  # pragma: no cover - the writer checks every tensor against the plan
        raise RuntimeError(f"{target}: wrote {size} bytes, planned {result['bytes']}")
    return {**result, "written": True}


def needs(formats, *, smoothed: bool = False) -> str:
    """What the formats need of ComfyUI, one family each (the loaders' commits, spec §1), and of a smoothed
    file, what its smoothing needs."""
    families = {registry.layer_format(f).family: registry.layer_format(f) for f in formats}
    found = [families[f].min_comfyui for f in sorted(families)]
    if smoothed:
        found += [registry.layer_format(f).smoothed_loads_in for f in sorted(formats) if smoothed_format(f)]
    return "; ".join(found)


def format_report(r: dict) -> str:
    lines = [f"{r['format']}: {r['layers']} linears quantized, {r['tensor_count']} tensors, {r['bytes']:,} bytes "
             f"({r['bytes'] / 1e9:.2f} GB)" + (f"; kept in BF16: {', '.join(r['keep'])}" if r["keep"] else "")]
    if r.get("unrotated"):
        lines.append(f"  row-wise INT8 without ConvRot for {len(r['unrotated'])} linears whose inputs 256 does not "
                     f"divide (e.g. {r['unrotated'][0]})")
    if not r["written"]:
        return "\n".join(lines + ["dry run: nothing written"])
    return "\n".join(lines + [f"wrote {r['output']}",
                              "  ComfyUI: put it in ComfyUI/models/diffusion_models/ and load it with Load Diffusion "
                              f"Model; needs {r['needs']}; older ComfyUI cannot load it (use to-fp8 --format scaled)",
                              f"  check it: qconvert verify {r['output']} --reference SOURCE --report DIR"])
