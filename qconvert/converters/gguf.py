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
qconvert to-gguf ./qwen-image --level Q4_K_M,Q3_K_M --policy measured -o gguf/
qconvert to-gguf ./qwen-image --level all -o gguf/ --dry-run
""")


@dataclass(frozen=True)
class GgufOptions:
    level: str = option(required=True, metavar="LEVEL", show_default=False,
                        help="BF16, F16, Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q5_1, Q5_0, Q4_K_M, Q4_K_S, Q4_1, IQ4_NL, Q4_0, "
                             "IQ4_XS, Q3_K_M, Q3_K_S, Q2_K, all, or a list (Q8_0,Q4_K_M): several levels read "
                             "the source once.")
    policy: str = option("city96", choices=("city96", "quantstack", "uniform", "measured"),
                         help="Per-tensor types: city96's published files, QuantStack's (blocks 0/last at Q5_K), "
                              "every block linear at the level's base type, or measured: each block linear's "
                              "type chosen by the block measure within city96's size for the level (or "
                              "--target-size).")
    target_size: float | None = option(None, kind=float, metavar="GB", show_default=False,
                                       help="With --policy measured and one level: the file's size in GB "
                                            "instead of city96's at that level.")
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
        chosen, measured, lines, detail = None, None, [], None
        if o.policy == "measured":
            chosen, measured, lines, detail = _measured(src, levels, o, importance, record, source.device, echo)
            if not dry_run:  # what was chosen, before the writing starts (--dry-run prints it with the plan)
                for line in lines:
                    echo(line)
        elif o.target_size is not None:
            raise UsageError("--target-size is for --policy measured")
        plans = writer.plan_files(src, levels, policy=o.policy, minimal_metadata=o.minimal_metadata,
                                  dry_run=dry_run, imatrix=record, chosen=chosen, measured=measured)
        if not dry_run:
            writer.write_gguf(src, plans, paths, device=source.device, quiet=quiet, imatrix=importance)
        hints = writer.load_hints(paths[-1], src)
    if dry_run:
        text = "\n".join([*lines, *(writer.format_plan(plan, path) for plan, path in zip(plans, paths))])
    else:
        text = "\n".join([f"wrote {path}  ({plan.level}, {plan.bytes:,} bytes)" for plan, path in zip(plans, paths)]
                         + ["  " + line for line in hints])
    report = writer.report_json(plans, paths, written=not dry_run)
    if detail is not None:
        report["measured"] = detail
    return Result(report, text, list(paths))


def _measured(src, levels, o: GgufOptions, importance, record, device, echo):
    """({level: {weight: type}}, provenance options, plan lines, {level: {layer: its type, error, bytes and
    every candidate's error}}) for --policy measured: one measurement, then per level the least-error types
    whose file is no larger than city96's at that level (or --target-size)."""
    from qconvert.running import gguf_mix

    if o.target_size is not None and len(levels) > 1:
        raise UsageError("--target-size names one file's size: give one --level with it")
    sizes = gguf_mix.sizes_of(src)
    within = "city96's file size at the level" if o.target_size is None else f"{int(o.target_size * 1e9)} bytes"
    measured = {"measured_on": gguf_mix.measured_on(src), "measured_within": within}

    all_bf16 = {f"{m}.weight": gguf_mix.T.BF16 for m in sizes}
    metadata = {}   # per level, as the file will carry it: provenance (a source fingerprint) computed once

    def file_bytes(level, types):
        if level not in metadata:
            metadata[level] = writer.plan_files(src, [level], policy="measured", minimal_metadata=o.minimal_metadata,
                                                dry_run=True, imatrix=record, chosen={level: all_bf16},
                                                measured=measured)[0].metadata
        return writer.plan_gguf(src, level, policy="measured", metadata=metadata[level],
                                has_imatrix=record is not None, chosen=types).bytes

    budgets = {}
    for level in levels:  # every size checked before the measuring starts
        target = (int(o.target_size * 1e9) if o.target_size is not None else  # city96's published size
                  writer.plan_gguf(src, level, policy="city96").bytes)
        budget = target - (file_bytes(level, all_bf16)
                           - sum(row["BF16"] for row in sizes.values()))
        gguf_mix.check_budget(sizes, budget, f"--level {level}: a file of {target:,} bytes")
        budgets[level] = target, budget
    errors = gguf_mix.measure(src, importance=importance, device=device or "cpu", echo=echo)
    chosen, lines, detail = {}, [], {}
    for level, (target, budget) in budgets.items():
        for _ in range(4):  # tensor padding can differ from the estimate: tighten and choose again
            chosen[level] = gguf_mix.choose_types(errors, sizes, budget)
            over = file_bytes(level, chosen[level]) - target
            if over <= 0:
                break
            budget -= over
        module_choice = {n.removesuffix(".weight"): t.name for n, t in chosen[level].items()}
        lines += [f"{level} measured, within {target:,} bytes ({within}); per layer:",
                  *gguf_mix.mix.plan_lines(errors, sizes, module_choice)]
        detail[level] = {"target_bytes": target, "layers": {
            m: {"type": f, "error": errors[m][f], "bytes": sizes[m][f], "candidates": errors[m]}
            for m, f in sorted(module_choice.items())}}
    return chosen, measured, lines, detail


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
