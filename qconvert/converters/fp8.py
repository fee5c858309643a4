"""``to-fp8``: FP8 safetensors for ComfyUI (three layouts) and, through the dequantizing loader, diffusers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qconvert.converters.base import Converter, Result, Source, UsageError, option, silent
from qconvert.converters.catalog import help_text
from qconvert.core.errors import QConvertError
from qconvert.formats.comfyui import fp8

SUMMARY = help_text("to-fp8", """\
The default output name is SOURCE-fp8mixed-e4m3fn.safetensors (comfy), -fp8-e4m3fn-scaled (scaled) or
-fp8-e4m3fn (plain), in the current folder or in -o when -o is a folder.  ComfyUI: put the file in
ComfyUI/models/diffusion_models/ and use Load Diffusion Model.  diffusers: load_dequantized() in
qconvert.formats.comfyui.loader turns any of the layouts into a BF16 state dict for from_single_file.

\b
qconvert to-fp8 Qwen/Qwen-Image
qconvert to-fp8 ./qwen-image --keep mod -o out/
qconvert to-fp8 ./qwen-image --format plain --dry-run --json
""")


@dataclass(frozen=True)
class Fp8CommandOptions:
    layout: str = option("comfy", name="format", choices=fp8.LAYOUTS,
                         help="comfy: ComfyUI's per-layer layout (weight + weight_scale + comfy_quant), block linears "
                              "in FP8, the rest BF16.  scaled: the legacy scaled_fp8/scale_weight layout for ComfyUI "
                              "without comfy_quant support (e4m3fn only; every linear in FP8, as old ComfyUI stores "
                              "them).  plain: every tensor cast unscaled, keys sorted, no metadata (Comfy-Org's "
                              "qwen_image_fp8_e4m3fn layout; no provenance; runtime LoRAs may show grid artifacts).")
    dtype: str = option("e4m3fn", choices=tuple(fp8.FP8_TYPES),
                        help="FP8 type: e4m3fn (more precision) or e5m2 (more range).")
    keep: tuple = option((), multiple=True, metavar="GROUP[,GROUP]",
                         help="comfy only: keep these block-linear groups in BF16, e.g. mod (img_mod/txt_mod, a third "
                              "of the model and the most sensitive), attn, mlp, qkv, v, mlp_down, or one role like "
                              "txt_mod.")
    activations: str = option("full-precision", choices=fp8.ACTIVATION_MODES,
                              help="comfy only: how ComfyUI treats each layer's input on FP8 GPUs.  full-precision: a "
                                   "BF16 matmul (safe, Comfy-Org's choice).  calibrated: an FP8 matmul with "
                                   "input_scale from --calib.  unit: no scale (inputs beyond 448 saturate; the layout "
                                   "qconvert wrote before).")
    calib: Path | None = option(None, kind=Path, show_default=False,
                                help="With --activations calibrated: statistics from qconvert calibrate.")
    margin: float = option(1.25, help="With --activations calibrated: input_scale = margin * calibrated amax / 448.")
    input_tolerance: float = option(2.0, help="With --activations calibrated: a layer keeps its FP8 matmul when, "
                                              "measured on a short reference run as the native runtime computes "
                                              "it, its error is at most 1 + this times the full-precision "
                                              "matmul's; else full precision.")


def run(source: Source, o: Fp8CommandOptions, output=None, *, dry_run: bool = False, quiet: bool = False,
        echo: Callable[[str], None] = silent) -> Result:
    try:
        options = fp8.make_options(o.layout, o.dtype, o.keep, o.activations, o.margin, o.input_tolerance)
    except QConvertError as exc:
        raise UsageError(str(exc)) from None
    if (o.activations == "calibrated") != (o.calib is not None):
        raise UsageError("--activations calibrated and --calib FILE go together")
    measured = None
    with source.open() as src:
        if o.calib is not None:
            options, measured = _measured_scales(src, options, o.calib, source.device, echo)
        report = fp8.convert(src, output, options, device=source.device, dry_run=dry_run, quiet=quiet)
    if measured is not None:
        report["fp8_matmul"] = measured
    text = fp8.format_report(report)
    if measured is not None:
        kept = measured["full_precision"]
        text = (f"FP8 matmuls chosen for the native runtime: {measured['layers'] - len(kept)} of {measured['layers']} "
                f"layers; full precision for {len(kept)}" + (f" ({', '.join(kept[:6])}"
                                                             f"{', ...' if len(kept) > 6 else ''})" if kept else "")
                + "\n" + text)
    return Result(report, text, [Path(report["output"])])


def _measured_scales(src, options, calib, device: str, echo) -> tuple:
    """Calibrated options whose full-precision layers were chosen by measuring each FP8 matmul as the native
    runtime computes it (``running.fp8_matmul``), and what was measured."""
    from qconvert.running.fp8_matmul import full_precision_layers, matmul_errors

    scales = fp8.static_scales(options, src, calib)
    seeds = held_out_seeds(calib)
    errors = matmul_errors(src, dict(scales), options.dtype, seeds=seeds, device=device, echo=echo)
    unseen = {m for m, s in scales if s is None}
    keep = full_precision_layers(errors, options.input_tolerance) | unseen
    measured = {"runtime": "native", "tolerance": options.input_tolerance, "layers": len(scales),
                "held_out_seeds": list(seeds),
                "full_precision": sorted(keep), "errors": errors}
    return fp8.with_input_scales(options, scales, frozenset(keep)), measured


def held_out_seeds(calib) -> tuple:
    """Two synthetic prompt seeds the calibration did not draw: its own are --seed .. --seed + prompts - 1."""
    import json

    from qconvert.core.checkpoint import read_safetensors_header
    from qconvert.running.fp8_matmul import HELD_OUT_SEEDS

    try:
        made = json.loads(read_safetensors_header(Path(calib)).metadata.get("qconvert", "{}")).get("options", {})
        first, count = int(made.get("seed", 0)), int(made.get("prompts", 0))
    except (ValueError, TypeError, AttributeError):  # a calibration from elsewhere: its prompts are unknown
        return HELD_OUT_SEEDS
    if first + count <= HELD_OUT_SEEDS[0] or first > HELD_OUT_SEEDS[-1]:
        return HELD_OUT_SEEDS
    return first + count, first + count + 1


def demo_step(model: Path, out: Path, quiet: bool, echo: Callable[[str], None]) -> list[Path]:
    """``qconvert demo``: the default (comfy) FP8 file of the tiny model, and how to load it."""
    src = Source(str(model))
    with src.open() as opened:
        name = fp8.default_name(opened, fp8.Fp8Options())
    r = run(src, Fp8CommandOptions(), Path(out) / name, quiet=quiet).report
    path = Path(r["output"])
    fp8_count = r["types"].get(fp8.FP8_TYPES["e4m3fn"].st_type, {}).get("tensors", 0)
    echo(f"fp8 (comfy)     {path}  ({fp8_count} FP8 linears + scales, {r['bytes']:,} bytes)")
    echo(f"                {fp8.LOAD_HINTS['comfy']}")
    echo(f"                {fp8.diffusers_hint(path, r['diffusers_config'])}")
    return [path]


CONVERTER = Converter("to-fp8", Fp8CommandOptions, run, SUMMARY, suffix=".safetensors", calibration="calib")
