"""``to-gguf``: GGUF files for ComfyUI-GGUF and diffusers, at one llama.cpp level or several from one read."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qconvert.converters.base import Converter, Result, Source, UsageError, option, silent
from qconvert.converters.catalog import help_text
from qconvert.core.errors import QConvertError
from qconvert.formats.gguf import writer
from qconvert.formats.gguf.policy import expand_levels

SUMMARY = help_text("to-gguf", """\
Files are named MODEL-LEVEL.gguf (qwen-image-Q4_K_M.gguf) in the current folder; -o is the file for one
level and the folder for all.  Provenance goes in qconvert.* keys unless --minimal-metadata.  ComfyUI: put
the file in ComfyUI/models/diffusion_models/ and load it with ComfyUI-GGUF's Unet Loader (GGUF).  diffusers:
QwenImageTransformer2DModel.from_single_file(FILE, quantization_config=GGUFQuantizationConfig(...),
config="Qwen/Qwen-Image", subfolder="transformer").

\b
qconvert to-gguf Qwen/Qwen-Image --level Q4_K_M
qconvert to-gguf ./qwen-image --level all -o gguf/ --dry-run
""")


@dataclass(frozen=True)
class GgufOptions:
    level: str = option(required=True, metavar="LEVEL", show_default=False,
                        help="BF16, F16, Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q5_1, Q5_0, Q4_K_M, Q4_K_S, Q4_1, IQ4_NL, Q4_0, "
                             "IQ4_XS, Q3_K_M, Q3_K_S, Q2_K, all, or a list (Q8_0,Q4_K_M): several levels read the source once.")
    policy: str = option("city96", choices=("city96", "quantstack", "uniform"),
                         help="Per-tensor types: city96's published files, QuantStack's (blocks 0/last at Q5_K), "
                              "or every block linear at the level's base type.")
    minimal_metadata: bool = option(False, help="Only general.architecture, quantization_version and file_type "
                                                "(no qconvert.* provenance).")
    imatrix: Path | None = option(None, kind=Path, show_default=False,
                                  help="A calibration file from qconvert calibrate: the block types weight their "
                                       "rounding error by each input channel's mean square, as llama-quantize "
                                       "--imatrix does.")


def run(source: Source, o: GgufOptions, output=None, *, dry_run: bool = False, quiet: bool = False,
        echo: Callable[[str], None] = silent) -> Result:
    try:
        levels = expand_levels(o.level)
    except QConvertError as exc:
        raise UsageError(str(exc)) from None
    with source.open() as src:
        paths = writer.output_paths(src.name, levels, output)
        importance, record = None, None
        if o.imatrix is not None:
            from qconvert.core.io import file_sha256
            from qconvert.formats.gguf.imatrix import read_imatrix

            importance = read_imatrix(o.imatrix, src)
            record = f"{Path(o.imatrix).name} sha256:{file_sha256(o.imatrix)}"
        plans = writer.plan_files(src, levels, policy=o.policy, minimal_metadata=o.minimal_metadata,
                                  dry_run=dry_run, imatrix=record)
        if not dry_run:
            writer.write_gguf(src, plans, paths, device=source.device, quiet=quiet, imatrix=importance)
        hints = writer.load_hints(paths[-1], src)
    if dry_run:
        text = "\n".join(writer.format_plan(plan, path) for plan, path in zip(plans, paths))
    else:
        text = "\n".join([f"wrote {path}  ({plan.level}, {plan.bytes:,} bytes)" for plan, path in zip(plans, paths)]
                         + ["  " + line for line in hints])
    return Result(writer.report_json(plans, paths, written=not dry_run), text, list(paths))


def demo_step(model: Path, out: Path, quiet: bool, echo: Callable[[str], None]) -> list[Path]:
    """``qconvert demo``: the tiny model at Q4_K_M and Q8_0, written side by side."""
    r = run(Source(str(model)), GgufOptions(level="Q8_0,Q4_K_M"), Path(out) / "gguf", quiet=quiet)
    for level, path in zip(("Q8_0", "Q4_K_M"), r.paths):
        echo(f"gguf {level:<10} {path}  ({os.path.getsize(path):,} bytes)")
    for line in r.text.splitlines()[2:]:
        echo(" " * 14 + line)
    return list(r.paths)


CONVERTER = Converter("to-gguf", GgufOptions, run, SUMMARY, suffix=".gguf", calibration="imatrix",
                      not_in_recipes=(("level", "all"),))
