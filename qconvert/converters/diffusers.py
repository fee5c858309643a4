"""``to-diffusers``: single files diffusers loads natively quantized (fp8r, nvfp4) through BFLQuantizationConfig."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qconvert.converters.base import Converter, Result, Source, UsageError, option, silent
from qconvert.converters.catalog import help_text
from qconvert.formats import bfl

SUMMARY = help_text("to-diffusers", """\
The default output name is SOURCE-diffusers-FORMAT.safetensors.  Load it with
QwenImageTransformer2DModel.from_single_file(FILE, config=..., subfolder="transformer",
quantization_config=BFLQuantizationConfig()) (diffusers 0.42 or later, with accelerate).

\b
qconvert to-diffusers ./qwen-image --format fp8r
qconvert to-diffusers ./qwen-image --format nvfp4 --calib stats.safetensors
qconvert to-diffusers ./qwen-image --format nvfp4 --dry-run --json
""")


@dataclass(frozen=True)
class DiffusersCommandOptions:
    # not a click Choice: asking for a format diffusers cannot load natively is an error that says where it goes
    fmt: str = option("fp8r", name="format", kind=str, metavar="fp8r|nvfp4",
                      help="fp8r: FP8 weights with a scale per row (FP8 matmuls on RTX 40 and later).  nvfp4: "
                           "NVFP4 (ModelOpt layout; NVFP4 matmuls on RTX 50 with FlashInfer).  Elsewhere diffusers "
                           "dequantizes each weight in every forward, keeping the memory saving.")
    keep: tuple = option((), multiple=True, metavar="GROUP[,GROUP]", help="Keep these block-linear groups in BF16.")
    calib: Path | None = option(None, kind=Path, show_default=False,
                                help="nvfp4: statistics from qconvert calibrate; each layer's input_scale = margin * "
                                     "calibrated amax / 2688 (without it, 1.0).")
    margin: float = option(4.0, help="With --calib: the calibrated amax is multiplied by this.  The FP8 block "
                                     "scales span 2^17, so room above the calibration costs little, while inputs "
                                     "beyond the scale's reach saturate (1.25 did, on prompts the calibration had "
                                     "not seen).")


def run(source: Source, o: DiffusersCommandOptions, output=None, *, dry_run: bool = False, quiet: bool = False,
        echo: Callable[[str], None] = silent) -> Result:
    options = bfl.make_options(o.fmt, o.keep, o.margin)  # a format diffusers cannot load: error, exit 1
    if o.calib is not None and o.fmt != "nvfp4":
        raise UsageError("--calib is for --format nvfp4 (its static input_scale); fp8r scales its inputs per row")
    with source.open() as src:
        if o.calib is not None:
            options = _calibrated(src, options, o.calib)
        report = bfl.convert(src, output, options, device=source.device, dry_run=dry_run, quiet=quiet)
    return Result(report, bfl.format_report(report), [Path(report["output"])])


def _calibrated(src, options: bfl.BflOptions, calib: Path) -> bfl.BflOptions:
    from dataclasses import replace

    from qconvert.formats.calibration import read_stats

    # another model's statistics: an error naming the first layer they do not fit
    stats = read_stats(calib, src, bfl.quantized_layers(src, options))
    return replace(options, input_scales=bfl.calibrated_scales(stats, options.margin))


def demo_step(model: Path, out: Path, quiet: bool, echo: Callable[[str], None]) -> list[Path]:
    """``qconvert demo``: an fp8r and an nvfp4 file diffusers loads natively."""
    src = Source(str(model))
    written = []
    for fmt in bfl.FORMATS:
        r = run(src, DiffusersCommandOptions(fmt=fmt), Path(out), quiet=True).report
        echo(f"{fmt + ' (diffusers)':<16}{r['output']}  ({r['layers']} layers, {r['bytes']:,} bytes); needs "
             f"{r['needs']}")
        written.append(Path(r["output"]))
    return written


CONVERTER = Converter("to-diffusers", DiffusersCommandOptions, run, SUMMARY, suffix=".safetensors",
                      calibration="calib")
