"""FP8 safetensors for ComfyUI and diffusers: three layouts, one plan, one loader.

Layouts (``--format``; facts from shared/specs/fp8-lora-sampler.md §3-§5):

``comfy`` (default)
    ComfyUI's mixed-precision layout.  Each quantized linear ``L`` is stored as
    ``L.weight`` (F8_E4M3 or F8_E5M2), ``L.weight_scale`` (F32, shape ``[]``,
    ``amax / format max``: the dequantization multiplier) and ``L.comfy_quant``
    (U8, the UTF-8 bytes of ``{"format": "float8_e4m3fn"}``).  The JSON is
    written with ``json.dumps``' default separators, byte for byte what
    ComfyUI's own ``convert_old_quants`` injects; ComfyUI reads it with
    ``json.loads``, so the spacing is cosmetic but matching costs nothing.
    Activations (``--activations``; spec comfy-quant.md §2.2, §7.2): ComfyUI
    quantizes a layer's input with scale ``input_scale``, **1.0 when absent**,
    on GPUs with native FP8 (sm ≥ 8.9), so inputs beyond ±448 saturate.
    ``full-precision`` (default) adds ``"full_precision_matrix_mult": true``
    to each layer's JSON, as Comfy-Org's exporter does: ComfyUI dequantizes
    and runs a BF16 matmul.  ``calibrated`` writes ``input_scale = margin ·
    amax / 448`` from ``qconvert calibrate`` statistics and keeps the flag on
    the layers whose FP8 matmul, measured as the native runtime computes it
    on a short reference run (``running/fp8_matmul.py``), errs more than
    ``1 + input_tolerance`` times the full-precision matmul.  ``unit`` is the
    layout qconvert wrote before (no flag, no scale), for comparisons only.  By default the 840 block linears are
    quantized; ``--keep mod`` (any ``ROLE_GROUPS`` name) keeps groups in BF16.
    Everything else (biases, norms, img_in/txt_in, timestep MLP, norm_out,
    proj_out) is BF16.  Needs a ComfyUI recent enough to read ``comfy_quant``.

``scaled``
    The legacy layout that older ComfyUI reads: a ``scaled_fp8`` marker tensor
    plus ``L.scale_weight`` (F32 ``[]``, the dequantization multiplier) beside
    each FP8 ``L.weight``.  Decisions:

    * Every ``nn.Linear`` weight is scaled, the six top-level linears
      included: old ComfyUI builds *every* Linear in the marker's FP8 dtype
      (``scaled_fp8_ops(override_dtype=...)``) and casts a weight without
      ``scale_weight`` unscaled, which is exactly the plain-cast damage this
      layout exists to avoid.  Biases and norms stay BF16 (old ComfyUI casts
      what it must; new ComfyUI keeps them).  ``--keep`` is refused here for
      the same reason: a kept layer would be cast unscaled by old ComfyUI.
    * The marker is ``zeros([2])`` in the FP8 dtype.  Two elements mean "no
      FP8 matmul" to old ComfyUI and ``full_precision_matrix_mult`` to new
      ComfyUI: with no calibrated ``scale_input`` an FP8 matmul would clamp
      activations to ±448 unscaled, and Qwen-Image's activations exceed that.
      Zeros rather than ``torch.empty`` so the bytes are deterministic.
    * e4m3fn only: new ComfyUI converts legacy files assuming e4m3fn whatever
      the marker says, so an e5m2 scaled file would load as garbage there.

``plain``
    A direct cast of every tensor, keys sorted, no ``__metadata__`` at all:
    the layout of Comfy-Org's ``qwen_image_fp8_e4m3fn.safetensors``
    (20,430,635,136 bytes for the full model).  It carries no provenance
    because the published file has none.  Small weights are lost (e4m3fn's
    smallest step is 2^-9), which is why runtime LoRAs show grid artifacts on it.

In every layout the Edit-2511 marker ``__index_timestep_zero__`` passes through
as it was; a diffusers-layout Edit-2511 source (which signals the variant
with ``zero_cond_t`` in its config instead) gets an empty BF16 marker, because
ComfyUI only recognises the variant by that tensor.  Tensors outside the model
(``--allow-extra``) pass through unchanged.

Casting: ``w * (1 / scale)`` in float32 (comfy-kitchen's order), clamped to
±``finfo.max``, then ``.to(float8)``, which rounds to nearest even; the clamp
makes NaN/Inf impossible whatever the torch version or device.  Every source tensor goes through ``check_finite`` first.

File order: by element size, then name — the order the safetensors library
writes — so every tensor starts aligned to its element size.  That puts the
F32 scales first, before the weights they are computed from; they are written
as placeholders and filled in once their weights are done, so the source is
read once, one tensor at a time.

diffusers ignores ``weight_scale``/``scale_weight`` (it would upcast the raw
FP8 values without their scale), so for diffusers use the dequantizing loader::

    from diffusers import QwenImageTransformer2DModel
    from qconvert.formats.comfyui.loader import load_dequantized

    transformer = QwenImageTransformer2DModel.from_single_file(
        load_dequantized("qwen-image-fp8mixed-e4m3fn.safetensors"),
        config="Qwen/Qwen-Image", subfolder="transformer", torch_dtype=torch.bfloat16)
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from qconvert.codecs.comfyui import registry
from qconvert.codecs.comfyui.base import PRE_QUANT_SCALE
from qconvert.codecs.comfyui.layouts.fp8 import FP8_TYPES, Fp8Type, cast_fp8, quantize_fp8
from qconvert.core.checkpoint import DTYPES
from qconvert.core.errors import QConvertError
from qconvert.core.io import SafetensorsWriter, atomic_output, safetensors_size, safetensors_target, tensor_bytes
from qconvert.core.models import qwen_image as qi
from qconvert.core.pipeline import (
    TensorPlan,
    check_finite,
    parse_device,
    prefetched,
    progress,
    provenance,
    provenance_json,
    type_counts,
)

LAYOUTS = ("comfy", "scaled", "plain")
HIGH_PRECISION = "BF16"  # what non-quantized tensors become in the comfy and scaled layouts
SCALE_TYPE = "F32"
FLOAT_SCALE_TYPES = ("F32", "BF16", "F16", "F64")  # what a third-party file may store its scales as

# Names the layouts add beside a layer's weight (format knowledge, not model knowledge).
WEIGHT_SCALE = "weight_scale"  # comfy: dequantization multiplier
COMFY_QUANT = "comfy_quant"  # comfy: per-layer JSON config
SCALE_WEIGHT = "scale_weight"  # scaled: dequantization multiplier
ACTIVATION_SCALES = ("input_scale", "scale_input")  # activation scales some writers add; not weights
SCALED_FP8_MARKER = "scaled_fp8"
SCALED_FP8_MARKER_SHAPE = (2,)  # two elements: no FP8 matmul (see module docstring)
QUANT_METADATA = "_quantization_metadata"  # comfy layer configs kept in __metadata__ (third-party files)
# Every per-layer name ComfyUI's loaders give a meaning to (the block formats add theirs: NVFP4's
# weight_scale_2, W4A8's weight_s_rel ...).
AUX_SUFFIXES = tuple(dict.fromkeys((WEIGHT_SCALE, COMFY_QUANT, SCALE_WEIGHT, *ACTIVATION_SCALES,
                                    *registry.stored_suffixes(), PRE_QUANT_SCALE)))
PROVENANCE_KEY = "qconvert"


# ------------------------------------------------------------------ options

ACTIVATION_MODES = ("full-precision", "calibrated", "unit")
FULL_PRECISION = "full_precision_matrix_mult"
# Layers that keep full-precision matmuls when nothing was measured (``unit``): sglang keeps img_mlp.net.2 in
# BF16 after ablation (sgl-project/sglang#23155); vllm-omni's LPIPS fell from 0.30 to 0.17 with the sensitive
# layers kept BF16 (#1764, #2795).  ``calibrated`` measures every layer instead.
UNMEASURED_FULL_PRECISION = ("img_mlp.net.2",)
INPUT_SCALE = "input_scale"


@dataclass(frozen=True)
class Fp8Options:
    layout: str = "comfy"
    dtype: str = "e4m3fn"
    keep: tuple = ()  # ROLE_GROUPS names kept in BF16 (comfy layout only), sorted
    activations: str = "full-precision"  # comfy layout: how ComfyUI treats each layer's input (module docstring)
    input_scales: tuple = ()  # calibrated: ((layer, input_scale or None for full precision), ...), sorted
    margin: float = 1.25
    input_tolerance: float = 2.0  # calibrated: how much more error an FP8 matmul may make (running/fp8_matmul.py)

    def layer_config(self, layer: str) -> tuple[dict, float | None]:
        """(the layer's comfy_quant JSON object, its input_scale or None)."""
        conf = {"format": self.fp8.comfy_format}
        scale = dict(self.input_scales).get(layer) if self.activations == "calibrated" else None
        if self.activations == "full-precision" or (self.activations == "calibrated" and scale is None) or \
                (self.activations == "unit" and layer.endswith(tuple("." + s for s in UNMEASURED_FULL_PRECISION))):
            conf[FULL_PRECISION] = True
        return conf, scale

    @property
    def fp8(self) -> Fp8Type:
        return FP8_TYPES[self.dtype]

    def kept_roles(self) -> frozenset:
        return frozenset().union(*(qi.ROLE_GROUPS[g] for g in self.keep))

    def to_json(self) -> dict:
        extra = {"activations": self.activations} if self.layout == "comfy" else {}
        if self.activations == "calibrated" and self.layout == "comfy":
            extra.update(margin=self.margin, full_precision_layers=sum(1 for _, v in self.input_scales if v is None),
                         input_tolerance=self.input_tolerance, chosen_for_runtime="native")
        if self.activations == "unit" and self.layout == "comfy":
            extra.update(full_precision_layers=list(UNMEASURED_FULL_PRECISION))
        return {"layout": self.layout, "dtype": self.dtype, "keep": list(self.keep), **extra,
                "scale": "per-tensor amax/max" if self.layout != "plain" else "none",
                "rounding": "nearest-even, clamped to the format's range"}


def make_options(layout: str = "comfy", dtype: str = "e4m3fn", keep: Iterable[str] = (),
                 activations: str = "full-precision", margin: float = 1.25,
                 input_tolerance: float = 2.0) -> Fp8Options:
    """Validated options; ``keep`` items may be comma-separated ("mod,v").  Calibrated input scales are
    added by ``with_input_scales`` once the source is open."""
    if activations not in ACTIVATION_MODES:
        raise QConvertError(f"--activations {activations}: choose {', '.join(ACTIVATION_MODES)}")
    if activations != "full-precision" and layout != "comfy":
        raise QConvertError(f"--activations {activations} needs --format comfy (the {layout} layout has no "
                            "per-layer activation settings)")
    if not 1.0 <= margin <= 16:
        raise QConvertError(f"--margin {margin}: give 1 to 16 (the calibrated maximum is multiplied by it)")
    if not 0 <= input_tolerance <= 1000:
        raise QConvertError(f"--input-tolerance {input_tolerance}: give 0 to 1000 (how many times the weight's own "
                            "error an FP8 matmul may add)")
    if layout not in LAYOUTS:
        raise QConvertError(f"unknown FP8 layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if dtype not in FP8_TYPES:
        raise QConvertError(f"unknown FP8 dtype {dtype!r}; choose from {', '.join(FP8_TYPES)}")
    groups = qi.parse_role_groups(keep)
    if groups and layout != "comfy":
        raise QConvertError(f"--keep needs --format comfy: the {layout} layout stores every linear in FP8 "
                            "(old ComfyUI casts a BF16 linear in a scaled file to FP8 without a scale)")
    if layout == "scaled" and dtype != "e4m3fn":
        raise QConvertError("--format scaled supports only --dtype e4m3fn: current ComfyUI reads every legacy "
                            "scaled file as e4m3fn; use --format comfy for e5m2")
    return Fp8Options(layout, dtype, tuple(groups), activations, (), margin, input_tolerance)


def with_input_scales(options: Fp8Options, scales: list, full_precision=frozenset()) -> Fp8Options:
    """``calibrated`` options with each quantized layer's input_scale (``static_scales``), or None (a
    full-precision matmul) for the layers in ``full_precision`` and those that saw no input."""
    from dataclasses import replace

    return replace(options, input_scales=tuple((layer, None if layer in full_precision else scale)
                                               for layer, scale in scales))


def static_scales(options: Fp8Options, source, calib) -> list[tuple[str, float | None]]:
    """[(layer, margin · calibrated amax / the format's max, or None when the layer saw no input)] in order."""
    from qconvert.formats.calibration import read_stats

    layers = sorted(qi.describe(n).module for n in quantized_names(source, options))
    stats = read_stats(calib, source, layers)
    out = []
    for layer in layers:
        amax = float(stats[layer].absmax.max())
        out.append((layer, options.margin * amax / options.fp8.max if amax > 0 else None))
    return out


# --------------------------------------------------------------------- plan

class How(enum.Enum):
    """How one output tensor is made."""

    QUANTIZE = "quantize"  # per-tensor scaled FP8; its scale goes to the row's ``scale`` tensor
    CAST = "cast"  # value cast to out_type (BF16, plain FP8) or unchanged pass-through
    SCALE = "scale"  # the F32 scale of a QUANTIZE row, known once that row is encoded
    CONST = "const"  # fixed at plan time: comfy_quant JSON, scaled_fp8 marker, added Edit-2511 marker


@dataclass(frozen=True)
class Fp8Tensor:
    plan: TensorPlan
    how: How
    scale: str | None = None  # QUANTIZE rows: out_name of the scale tensor


@dataclass(frozen=True)
class Fp8Plan:
    options: Fp8Options
    rows: tuple  # Fp8Tensor, in file order
    metadata: Mapping[str, str] | None

    @property
    def tensors(self) -> list[TensorPlan]:
        return [r.plan for r in self.rows]

    @property
    def entries(self) -> list[tuple[str, str, tuple]]:
        return [(r.plan.out_name, r.plan.out_type, r.plan.shape) for r in self.rows]

    @property
    def total_bytes(self) -> int:
        """The exact output file size."""
        return safetensors_size(self.entries, self.metadata)


def comfy_quant_config(conf: dict) -> bytes:
    """``<layer>.comfy_quant`` contents, as ComfyUI writes them (json.dumps defaults)."""
    return json.dumps(conf).encode("utf-8")


def quantized_names(source, options: Fp8Options) -> set[str]:
    """Source tensors stored as scaled FP8 (empty for the plain layout)."""
    if options.layout == "plain":
        return set()
    kept = options.kept_roles()
    names = set()
    for name in source.tensors:
        if not qi.is_known(name):
            continue  # --allow-extra tensors pass through
        info = qi.describe(name)
        if options.layout == "comfy" and info.is_block_linear and info.role not in kept:
            names.add(name)
        elif options.layout == "scaled" and _is_linear_weight(info):
            names.add(name)
    return names


def _is_linear_weight(info: qi.TensorInfo) -> bool:
    # EMBED also covers Layered's addition_t_embedding, an nn.Embedding that no
    # FP8 op replaces; every other EMBED/FINAL weight is an nn.Linear.
    return info.is_block_linear or (info.role in (qi.Role.EMBED, qi.Role.FINAL)
                                    and info.name != qi.ADDITION_T_EMBEDDING)


def is_aux_name(name: str) -> bool:
    """A scale, layer config or marker that a ComfyUI loader reads beside the weights, not a weight."""
    return name == SCALED_FP8_MARKER or any(name.endswith("." + s) for s in AUX_SUFFIXES)


def _role(name: str) -> str:
    return qi.describe(name).role.value if qi.is_known(name) else "extra"


def _passes_through(name: str) -> bool:
    """Markers (flags, not weights) and tensors outside the model are copied as they are."""
    return not qi.is_known(name) or qi.describe(name).role is qi.Role.MARKER


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _row(name, out_name, shape, out_type, role, how, scale=None) -> Fp8Tensor:
    shape = tuple(shape)
    nbytes = _numel(shape) * DTYPES[out_type][0]
    return Fp8Tensor(TensorPlan(name, out_name, shape, out_type, nbytes, role), how, scale)


def plan_fp8(source, options: Fp8Options, *, dry_run: bool = False) -> Fp8Plan:
    """Every output tensor with its type and exact size, from the source's headers alone."""
    fp8 = options.fp8
    aux = next((n for n in source.tensors if not qi.is_known(n) and is_aux_name(n)), None)
    if aux is not None:
        # Passed through, it would be read as this file's own scale or layer config (or collide with one).
        raise QConvertError(f"tensor {aux} (from --allow-extra) has a name ComfyUI reads as a scale or layer "
                            "config; remove it from the source")
    quantize = quantized_names(source, options)
    scale_suffix = WEIGHT_SCALE if options.layout == "comfy" else SCALE_WEIGHT
    rows = []
    for name, meta in source.tensors.items():
        role = _role(name)
        if name in quantize:
            layer = qi.describe(name).module
            scale = f"{layer}.{scale_suffix}"
            rows.append(_row(name, name, meta.shape, fp8.st_type, role, How.QUANTIZE, scale))
            rows.append(_row(name, scale, (), SCALE_TYPE, "scale", How.SCALE))
            if options.layout == "comfy":
                conf, input_scale = options.layer_config(layer)
                blob = f"{layer}.{COMFY_QUANT}"
                rows.append(_row(blob, blob, (len(comfy_quant_config(conf)),), "U8", "comfy_quant", How.CONST))
                if input_scale is not None:
                    key = f"{layer}.{INPUT_SCALE}"
                    rows.append(_row(key, key, (), SCALE_TYPE, "input_scale", How.CONST))
        elif _passes_through(name):
            rows.append(_row(name, name, meta.shape, meta.dtype, role, How.CAST))
        else:
            out_type = fp8.st_type if options.layout == "plain" else HIGH_PRECISION
            rows.append(_row(name, name, meta.shape, out_type, role, How.CAST))
    if options.layout == "scaled":
        rows.append(_row(SCALED_FP8_MARKER, SCALED_FP8_MARKER, SCALED_FP8_MARKER_SHAPE, fp8.st_type,
                         "scaled_fp8", How.CONST))
    if source.config.zero_cond_t and qi.MARKER_EDIT_2511 not in source.tensors:
        rows.append(_row(qi.MARKER_EDIT_2511, qi.MARKER_EDIT_2511, (0,), HIGH_PRECISION, "marker", How.CONST))
    rows.sort(key=lambda r: (-DTYPES[r.plan.out_type][0], r.plan.out_name))
    if len({r.plan.out_name for r in rows}) != len(rows):  # pragma: no cover - a planning bug
        raise RuntimeError("two output tensors share a name")
    metadata = None
    if options.layout != "plain":
        info = provenance(source, dry_run=dry_run, fmt=f"safetensors-fp8-{options.layout}",
                          options=options.to_json())
        metadata = {PROVENANCE_KEY: provenance_json(info)}
    return Fp8Plan(options, tuple(rows), metadata)


# ------------------------------------------------------------------- encode

def cast_to(weight: torch.Tensor, out_type: str, fp8: Fp8Type) -> torch.Tensor:
    if out_type == fp8.st_type:
        return cast_fp8(weight, fp8)
    return weight.to(DTYPES[out_type][1])


def const_tensor(p: TensorPlan, options: Fp8Options) -> torch.Tensor:
    layer = p.out_name.rsplit(".", 1)[0]
    if p.role == "comfy_quant":
        return torch.frombuffer(bytearray(comfy_quant_config(options.layer_config(layer)[0])), dtype=torch.uint8)
    if p.role == "input_scale":
        return torch.tensor(options.layer_config(layer)[1], dtype=torch.float32)
    return torch.zeros(p.shape, dtype=DTYPES[p.out_type][1])


def write_fp8(source, plan: Fp8Plan, target: str | os.PathLike, *, device: str | torch.device = "cpu",
              quiet: bool = False) -> Path:
    """Encode tensor by tensor into ``target``, atomically (nothing is left behind on failure)."""
    target = Path(target)
    device = parse_device(str(device))
    fp8 = plan.options.fp8
    loaded = [r.plan for r in plan.rows if r.how in (How.QUANTIZE, How.CAST)]
    total = sum(source.tensors[p.name].nbytes for p in loaded)
    with atomic_output(target, expected_bytes=plan.total_bytes) as f, \
            progress(total, f"to-fp8 {target.name}", quiet=quiet) as bar, \
            contextlib.closing(prefetched(source.load, [p.name for p in loaded])) as weights:
        writer = SafetensorsWriter(f, plan.entries, plan.metadata)
        slots: dict[str, int] = {}  # scale name -> file offset of its placeholder
        scales: dict[str, torch.Tensor] = {}
        for row in plan.rows:
            p = row.plan
            if row.how is How.SCALE:
                slots[p.out_name] = f.tell()
                writer.write(p.out_name, torch.zeros((), dtype=torch.float32))  # filled in below
            elif row.how is How.CONST:
                writer.write(p.out_name, const_tensor(p, plan.options))
            else:
                _, weight = next(weights)                 # in plan order, read ahead
                check_finite(p.name, weight)
                if row.how is How.QUANTIZE:
                    q, scale = quantize_fp8(weight.to(device), fp8)
                    writer.write(p.out_name, q.cpu())
                    scales[row.scale] = scale.cpu()
                else:
                    writer.write(p.out_name, cast_to(weight.to(device), p.out_type, fp8).cpu())
                bar.update(source.tensors[p.name].nbytes)
                del weight
        writer.close()
        if slots.keys() != scales.keys():  # pragma: no cover - a planning bug
            raise RuntimeError(f"scales planned {sorted(set(slots) ^ set(scales))[:3]} do not match the weights")
        for name, offset in slots.items():
            f.seek(offset)
            f.write(tensor_bytes(scales[name]))
        f.seek(0, os.SEEK_END)
    return target


# ------------------------------------------------------------ names, report

def default_name(source, options: Fp8Options) -> str:
    """``qwen-image-fp8mixed-e4m3fn.safetensors`` and friends.

    ``fp8mixed`` is Comfy-Org's suffix for comfy_quant files with sensitive
    layers in high precision, ``-scaled`` the community's for the legacy
    layout, and ``fp8-e4m3fn`` alone names Comfy-Org's plain cast.
    """
    stem = {"comfy": f"{source.name}-fp8mixed-{options.dtype}",
            "scaled": f"{source.name}-fp8-{options.dtype}-scaled",
            "plain": f"{source.name}-fp8-{options.dtype}"}[options.layout]
    return stem + ".safetensors"


def output_path(source, options: Fp8Options, output) -> Path:
    return safetensors_target(output, default_name(source, options), getattr(source, "path", None))


def role_counts(plans: Iterable[TensorPlan]) -> dict:
    """role → {output type: tensors}, for the dry-run table."""
    counts: dict = {}
    for p in plans:
        counts.setdefault(p.role, Counter())[p.out_type] += 1
    return {role: dict(sorted(c.items())) for role, c in sorted(counts.items())}


def report(source, plan: Fp8Plan, target: Path, *, written: bool) -> dict:
    tensors = plan.tensors
    return {
        "command": "to-fp8",
        "format": plan.options.layout,
        "dtype": plan.options.dtype,
        "safetensors_dtype": plan.options.fp8.st_type,
        "keep": list(plan.options.keep),
        "source": str(source.path),
        "variant": source.variant,
        "output": str(target),
        "written": written,
        "bytes": plan.total_bytes,
        "tensor_count": len(tensors),
        "types": type_counts(tensors),
        "roles": role_counts(tensors),
        "tensors": {p.out_name: p.out_type for p in tensors},
        "metadata": dict(plan.metadata or {}),
        "diffusers_config": qi.diffusers_config(source),
    }


LOAD_HINTS = {
    "comfy": ("ComfyUI: put it in ComfyUI/models/diffusion_models/ and load it with Load Diffusion Model "
              "(weight_dtype default); needs a ComfyUI with comfy_quant support (newer than 0.3.64: older "
              "releases load it without complaint but use the FP8 weights unscaled, which gives noise; only a "
              "log line mentions the unexpected comfy_quant/weight_scale keys); for old ComfyUI use --format "
              "scaled"),
    "scaled": ("ComfyUI (old and new): put it in ComfyUI/models/diffusion_models/ and load it with "
               "Load Diffusion Model (weight_dtype default)"),
    "plain": ("ComfyUI: put it in ComfyUI/models/diffusion_models/ and load it with Load Diffusion Model; "
              "no scales, so runtime LoRAs (Lightning) may show grid artifacts"),
}


def diffusers_hint(path, config: str) -> str:
    # diffusers would drop the scales and upcast raw FP8 values, hence the dequantizing loader.
    return (f"diffusers: QwenImageTransformer2DModel.from_single_file(qconvert.formats.comfyui.loader.load_dequantized("
            f"{str(path)!r}), config={config!r}, subfolder='transformer', torch_dtype=torch.bfloat16)")


def format_report(r: dict) -> str:
    fp8 = FP8_TYPES[r["dtype"]]
    kept = f"; kept in BF16: {', '.join(r['keep'])}" if r["keep"] else ""
    lines = [f"to-fp8 {r['source']} ({r['variant']}) -> {r['output']}",
             f"  layout {r['format']}, {fp8.comfy_format}{kept}",
             f"  {'role':<14}{'tensors':>8}  types"]
    for role, counts in r["roles"].items():
        n = sum(counts.values())
        lines.append(f"  {role:<14}{n:>8}  " + ", ".join(f"{t} {c}" for t, c in counts.items()))
    lines.append(f"  {'total':<14}{r['tensor_count']:>8}  {r['bytes']:,} bytes ({r['bytes'] / 1e9:.2f} GB)")
    if not r["written"]:
        lines.append("dry run: nothing written")
    else:
        lines += [f"wrote {r['output']}", f"  {LOAD_HINTS[r['format']]}",
                  f"  {diffusers_hint(r['output'], r['diffusers_config'])}"]
    return "\n".join(lines)


def convert(source, output: str | os.PathLike | None = None, options: Fp8Options = Fp8Options(), *,
            device: str = "cpu", dry_run: bool = False, quiet: bool = False) -> dict:
    """Plan, then (unless ``dry_run``) write; returns the report (see ``report``)."""
    parse_device(device)
    plan = plan_fp8(source, options, dry_run=dry_run)
    target = output_path(source, options, output)
    if dry_run:
        return report(source, plan, target, written=False)
    write_fp8(source, plan, target, device=device, quiet=quiet)
    size = target.stat().st_size
    if size != plan.total_bytes:  # pragma: no cover - the writer checks every tensor against the plan
        raise RuntimeError(f"{target}: wrote {size} bytes, planned {plan.total_bytes}")
    return report(source, plan, target, written=True)
