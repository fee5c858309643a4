"""``calibrate``: the activation statistics file (importance matrix, absmax, sampled input rows) that
``to-gguf --imatrix``, ``to-fp8 --activations calibrated``, the weight-measured mix and ``to-svdquant`` read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qconvert.converters.base import Converter, Result, Source, UsageError, option, silent
from qconvert.converters.catalog import help_text
from qconvert.running.calibrate import run_calibrate
from qconvert.running.sample import SampleOptions, check_options

SUMMARY = help_text("calibrate", """\b
qconvert calibrate ./qwen-image --embeds p1.safetensors --embeds p2.safetensors -o calib.safetensors
qconvert calibrate ./qwen-image --synthetic 8 -o calib.safetensors
qconvert to-gguf ./qwen-image --level Q3_K_M --imatrix calib.safetensors
""")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CalibrateOptions:
    embeds: tuple = option((), multiple=True, kind=Path, help="Prompt embeddings files (as for sample); repeatable.")
    synthetic: int = option(0, help="Add N seeded synthetic prompts.")
    height: int = option(512)
    width: int = option(512)
    steps: int = option(8)
    cfg: float = option(1.0, help="True CFG scale (above 1 doubles the runs).")
    schedule: str = option("qwen", choices=("qwen", "lightning"))
    seed: int = option(0)
    keep_rows: int = option(64, help="Input rows sampled per layer (for SVDQuant).")
    dtype: str | None = option(None, choices=DTYPES, show_default=False)
    cache_gb: float = option(0.0, help="Keep this many GiB of converted weights between steps (the first blocks "
                                       "that fit); 0 streams every block at every step.  As fast as holding the "
                                       "model when it all fits.")


def safetensors_output(output, default: str) -> Path:
    """``-o`` (or ``default``) for commands that write one .safetensors file."""
    target = Path(output) if output else Path(default)
    if target.suffix.lower() != ".safetensors":
        raise UsageError(f"-o {target}: the output is a .safetensors file")
    return target


def run(source: Source, o: CalibrateOptions, output=None, *, dry_run: bool = False, quiet: bool = False,
        echo: Callable[[str], None] = silent) -> Result:
    target = safetensors_output(output, "calib.safetensors")
    if not o.embeds and o.synthetic < 1:
        raise UsageError("give --embeds FILE (repeatable) or --synthetic N")
    options = SampleOptions(height=o.height, width=o.width, steps=o.steps, cfg=o.cfg, schedule=o.schedule,
                            seed=o.seed, device=source.device, dtype=o.dtype, cache_gb=o.cache_gb)
    if dry_run:
        check_options(options)
        report = {"command": "calibrate", "dry_run": True, "output": str(target), **options.to_json()}
        return Result(report, f"would write {target}", [target])
    with source.open() as src:
        report = run_calibrate(src, options, list(o.embeds), o.synthetic, target, keep_rows=o.keep_rows, echo=echo)
    over = report["beyond_fp8"]
    text = (f"wrote {target}\n  {len(over)} block linear(s) saw inputs beyond ±448 (FP8 e4m3fn's range)"
            + (f", e.g. {', '.join(over[:3])}" if over else ""))
    return Result(report, text, [target])


CONVERTER = Converter("calibrate", CalibrateOptions, run, SUMMARY)
