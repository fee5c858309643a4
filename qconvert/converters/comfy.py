"""``to-comfy``: ComfyUI's per-layer formats (NVFP4, MXFP8, INT8 ± ConvRot, W4A4), one or a size-budgeted mix."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qconvert.codecs.comfyui import registry
from qconvert.converters import fp8 as fp8_converter
from qconvert.converters.base import Converter, Result, Source, UsageError, option, silent
from qconvert.converters.catalog import help_text
from qconvert.core.errors import QConvertError
from qconvert.formats.comfyui import writer as comfy

SUMMARY = help_text("to-comfy", """\b
qconvert to-comfy ./qwen-image --format nvfp4
qconvert to-comfy ./qwen-image --format int8 --lora lightning.safetensors
qconvert to-comfy ./qwen-image --format mxfp8 --keep mod --dry-run --json
qconvert to-comfy ./qwen-image --format mix --target-size 16
""")


@dataclass(frozen=True)
class ComfyCommandOptions:
    fmt: str = option("nvfp4", name="format", choices=("fp8", *comfy.FORMATS, "mix"),
                      help="nvfp4 (RTX 50), mxfp8 (Blackwell), int8 (row-wise with ConvRot; int8-row, int8-tensor "
                           "without), w4a8 and w6a8 (INT8 matmuls, RTX 20 and later; ComfyUI v0.31.0), awq-w4a16 "
                           "(4-bit weights, BF16 activations; measured below w4a8 and nvfp4, see README), "
                           "convrot-w4a4 (experimental), mix (see --target-size), fp8 (= to-fp8 --format comfy).")
    keep: tuple = option((), multiple=True, metavar="GROUP[,GROUP]", help="Keep these block-linear groups in BF16.")
    target_size: float | None = option(None, kind=float, show_default=False,
                                       help="mix: the file's size in GB; each linear gets the format (BF16, FP8, "
                                            "MXFP8, INT8, NVFP4, W4A8) that keeps the summed error least within it.")
    max_error: float | None = option(None, kind=float, show_default=False,
                                     help="mix: the largest mean layer error; the smallest file that keeps it.")
    calib: Path | None = option(None, kind=Path, show_default=False,
                                help="qconvert calibrate's statistics: --smooth's factors come from them; for a mix "
                                     "with the weight measure, each layer's error is weighted by its inputs' mean "
                                     "squares.")
    measure: str | None = option(None, name="sensitivity", choices=("block", "weight"), show_default=False,
                                 help="mix: block (default): the error each layer's format causes in its block's "
                                      "output on a short reference run, which sees which layers matter; weight "
                                      "(default with --calib): each layer's weight error, about half the time.")
    candidates: tuple = option((), multiple=True, metavar="FORMAT[,FORMAT]",
                               help="mix: choose among these formats only (BF16 always); w4a8,int8 gives a mix "
                                    "whose every layer runs natively on RTX 20/30/40/50 (INT8 matmuls).")
    runtime: str | None = option(None, choices=registry.RUNTIMES, show_default=False,
                                 help="mix and --smooth: the runtime the formats (or smoothing factors) are chosen "
                                      "for: native (default with the block measure) runs each candidate with its "
                                      "inputs quantized as its matmul does (RTX 40/50); dequantized (GPUs without "
                                      "the kernels; the weight measure's).")
    smooth: bool = option(False, help="nvfp4: AWQ-style smoothing (ComfyUI's pre_quant_scale, Comfy-Org/ComfyUI "
                                      "0271a469): each layer's per-input factor chosen from --calib's statistics by "
                                      "the error of its output as the runtime computes it.")


def run(source: Source, o: ComfyCommandOptions, output=None, *, dry_run: bool = False, quiet: bool = False,
        echo: Callable[[str], None] = silent) -> Result:
    if (o.fmt == "mix") != ((o.target_size is None) != (o.max_error is None)):
        raise UsageError("--format mix takes one of --target-size GB or --max-error X (and only mix does)")
    if o.candidates and o.fmt != "mix":
        raise UsageError("--candidates is for --format mix (the formats it chooses among)")
    if o.runtime is not None and o.fmt != "mix" and not o.smooth:
        raise UsageError("--runtime is for --format mix and --smooth (the runtime their choices are made for)")
    if o.smooth and o.fmt != "nvfp4":
        raise UsageError("--smooth is for --format nvfp4 (the format ComfyUI applies a pre_quant_scale to)")
    if o.smooth and o.calib is None:
        raise QConvertError("--smooth needs --calib STATS (from qconvert calibrate on this model): the smoothing "
                            "factors come from each layer's input statistics")
    if o.fmt == "fp8":
        return fp8_converter.run(source, fp8_converter.Fp8CommandOptions(keep=o.keep), output, dry_run=dry_run,
                                 quiet=quiet, echo=echo)
    try:
        options = comfy.make_options("nvfp4" if o.fmt == "mix" else o.fmt, o.keep)
    except QConvertError as exc:
        raise UsageError(str(exc)) from None
    lines = []
    with source.open() as src:
        mix = None
        if o.fmt == "mix":
            from qconvert.running.mix import mix_candidates, mixed_options

            try:
                among = mix_candidates(o.candidates)
            except QConvertError as exc:
                raise UsageError(str(exc)) from None
            options, mix, lines = mixed_options(src, target_size=o.target_size, max_error=o.max_error, calib=o.calib,
                                                keep=options.keep, device=source.device, echo=echo,
                                                measure=o.measure, runtime=o.runtime, candidates=among)
        smoother = None
        if o.smooth:
            options, smoother = _smoothing(src, options, o, source.device, dry_run, echo)
        try:
            report = comfy.convert(src, output, options, device=source.device, dry_run=dry_run, quiet=quiet,
                                   smoother=smoother)
        finally:
            if smoother is not None:
                smoother.close()
        if mix is not None:
            report["mix"] = mix
        if smoother is not None and not dry_run:
            report["smoothing"] = smoother.summary()
    text = comfy.format_report(report)
    if "smoothing" in report:
        s = report["smoothing"]
        text = (f"smoothing: {s['smoothed']} of {s['layers']} layers smoothed; mean output error on the calibration "
                f"rows {s['mean_error']:.4g} (unsmoothed {s['mean_plain_error']:.4g}, {s['runtime']} runtime)\n"
                + text)
    if mix is not None:
        text = "\n".join([f"mix: {report['bytes'] / 1e9:.3f} GB, mean layer error {mix['mean_error']:.3g}, chosen "
                          f"for the {mix['runtime']} runtime; per layer:", *lines, text])
    return Result(report, text, [Path(report["output"])])


def _smoothing(src, options, o: ComfyCommandOptions, device: str, dry_run: bool, echo):
    """The options recording how the factors are chosen, and the smoother that chooses them (the calibration
    checked against the model first, whatever else happens)."""
    import dataclasses

    from qconvert.core.io import file_sha256
    from qconvert.running.smoothing import DEFAULT_GRID, LayerSmoother

    runtime = o.runtime or "native"
    layers = [m for m, f in comfy.quantized_layers(src, options).items() if comfy.smoothed_format(f)]
    smoother = LayerSmoother(o.calib, src, layers, runtime=runtime, grid=DEFAULT_GRID, device=device)
    record = (("calibration", Path(o.calib).name), ("sha256", file_sha256(o.calib)), ("grid", DEFAULT_GRID),
              ("runtime", runtime))
    if not dry_run and layers:
        seconds = smoother.estimate_seconds()
        echo(f"smoothing {len(layers)} nvfp4 layers: {2 * DEFAULT_GRID - 1} candidates each, measured under the "
             f"{runtime} runtime on {device}; about {seconds / 60:.1f} min (from the first layer)")
    return dataclasses.replace(options, smoothing=record), smoother


def demo_step(model: Path, out: Path, quiet: bool, echo: Callable[[str], None]) -> list[Path]:
    """``qconvert demo``: one file of each block format of the tiny model, and where it loads."""
    src = Source(str(model))
    written, sizes = [], {}
    for fmt in (f.name for f in registry.FORMATS.values() if f.in_demo):
        r = run(src, ComfyCommandOptions(fmt=fmt), Path(out), quiet=True).report
        echo(f"{fmt + ' (comfy)':<16}{r['output']}  ({r['layers']} layers, {r['bytes']:,} bytes); needs {r['needs']}")
        written.append(Path(r["output"]))
        sizes[fmt] = r["bytes"]
    # a size-budgeted mix: a quarter of the way from the NVFP4 file's size to the INT8 file's
    target = (sizes["nvfp4"] + (sizes["int8"] - sizes["nvfp4"]) / 4) / 1e9
    r = run(src, ComfyCommandOptions(fmt="mix", target_size=target), Path(out), quiet=True).report
    counts = ", ".join(f"{n} {f}" for f, n in sorted(Counter(v["format"] for v in r["mix"]["layers"].values()).items()))
    echo(f"{'mix (comfy)':<16}{r['output']}  ({r['bytes']:,} bytes within {target * 1e9:,.0f}: {counts})")
    written.append(Path(r["output"]))
    return written


CONVERTER = Converter("to-comfy", ComfyCommandOptions, run, SUMMARY, suffix=".safetensors", calibration="calib")
