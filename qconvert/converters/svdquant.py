"""``qconvert to-svdquant``: Nunchaku INT4/NVFP4 files, one block in memory at a time.

Data flow: source (through ``--lora``: baked at full precision before any
smoothing) → activation statistics (a ``calibrate`` file, or a short run on
synthetic prompts, said so) → per block: fuse, search the smoothing, SVD,
quantize, pack (``algorithm``, ``layout``) → one safetensors file (Nunchaku
layout) or a diffusers transformer folder, written atomically against an
exact plan.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from qconvert.codecs.svdquant import algorithm
from qconvert.converters.base import Converter, Result, Source, option, silent
from qconvert.converters.catalog import help_text
from qconvert.core.io import SafetensorsWriter, atomic_directory, atomic_output, safetensors_size
from qconvert.core.pipeline import parse_device, progress
from qconvert.formats.svdquant import layout
from qconvert.formats.svdquant.plan import (  # noqa: F401 - the converter's names
    ACTIVATION_CONFIG,
    DIFFUSERS_WEIGHTS,
    NUNCHAKU_MODEL_CLASS,
    PRECISION_TAGS,
    RANKS_LIMIT,
    WEIGHT_CONFIG,
    SvdqOptions,
    check_options,
    default_name,
    metadata,
    output_path,
    plan_entries,
    quantization_config,
    top_level_names,
)
from qconvert.running.svdquant_search import block_stat_modules, calibration, calibration_info, quantize_block


def write_svdquant(source, o: SvdqOptions, meta, stats, target: Path, *, device, quiet, echo) -> list:
    """Stream the blocks into ``target``; returns every W4A4 group's findings."""
    layers, shapes = source.config.num_layers, source.shapes()
    entries = plan_entries(source, o)
    size = safetensors_size(entries, meta)
    found: list = []

    def encode(f) -> None:
        writer = SafetensorsWriter(f, entries, meta)
        for name in top_level_names(source):
            writer.write(name, source.load(name).to(torch.bfloat16))
        start = time.monotonic()
        with progress(layers, f"to-svdquant {target.name}", quiet=quiet, unit="block") as bar:
            for i in range(layers):
                block, notes = quantize_block(source, i, stats, o, device)
                found.extend(notes)
                for name, _, _ in layout.block_entries(o.layout, o.precision, o.file_rank, shapes, i):
                    writer.write(name, block.pop(name))
                del block
                bar.update(1)
                if i == 0 and layers > 1 and not quiet:
                    took = time.monotonic() - start
                    echo(f"  block 1/{layers} took {took:.1f} s; about {took * layers / 60:.1f} min in all")
        writer.close()

    if o.layout == "nunchaku":
        with atomic_output(target, expected_bytes=size) as f:
            encode(f)
    else:
        with atomic_directory(target, expected_bytes=size + 65536) as tmp:
            config = {**source.config.to_json(), "quantization_config": quantization_config(o, source.config)}
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            with open(tmp / DIFFUSERS_WEIGHTS, "wb") as f:
                encode(f)
                f.flush()
                os.fsync(f.fileno())
    return found


def convert(source, output=None, options: SvdqOptions = SvdqOptions(), *, device: str = "cpu",
            dry_run: bool = False, quiet: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Plan, then (unless ``dry_run``) calibrate if needed and write; returns the report."""
    check_options(source, options)
    dev = parse_device(device)
    if options.lora_mode == "lowrank":
        from dataclasses import replace

        from qconvert.formats.svdquant.lora_branch import total_rank

        options = replace(options, stored_rank=total_rank(source, options.rank, source.config.num_layers))
    target = output_path(source, options, output)
    if options.calib:
        from qconvert.formats.calibration import read_stats

        read_stats(options.calib, source, block_stat_modules(source.config))  # a wrong file fails before any work
    meta = metadata(source, options, calibration_info(options, device, dry_run=dry_run), dry_run=dry_run)
    entries = plan_entries(source, options)
    result = {"command": "to-svdquant", "output": str(target), "format": f"svdquant-{options.layout}",
              **options.to_json(), "tensor_count": len(entries), "bytes": safetensors_size(entries, meta),
              "written": False, "variant": source.variant, "calibration": "file" if options.calib else "synthetic"}
    if dry_run:
        return result
    start = time.monotonic()
    say = echo if not quiet else (lambda m: None)
    say(f"to-svdquant: {source.config.num_layers} blocks x 8 W4A4 layers x "
        f"{len(algorithm.candidates(options.grid))} smoothing candidates each (an SVD and a 4-bit quantization "
        f"per candidate), on {dev}; the time per block follows the first")
    stats = calibration(source, options, device, say)
    found = write_svdquant(source, options, meta, stats, target, device=dev, quiet=quiet, echo=echo)
    written = target if options.layout == "nunchaku" else target / DIFFUSERS_WEIGHTS
    if written.stat().st_size != result["bytes"]:  # pragma: no cover - the writer checks every tensor
        raise RuntimeError(f"{written}: wrote {written.stat().st_size} bytes, planned {result['bytes']}")
    n = max(len(found), 1)
    result.update(written=True, seconds=round(time.monotonic() - start, 1), layers=found,
                  mean_layer_error=sum(r["error"] for r in found) / n,
                  mean_plain_error=sum(r["plain_error"] for r in found) / n)
    return result


# ---------------------------------------------------------------- report

def load_hints(r: dict) -> list[str]:
    """Where the output loads, and what it needs there."""
    out = r["output"]
    tag = "INT4 runs on RTX 20/30/40 (sm_75-89)" if r["precision"] == "int4" else "NVFP4 runs on RTX 50 (sm_120)"
    if r["layout"] == "nunchaku":
        lines = [f"ComfyUI-nunchaku: put it in ComfyUI/models/diffusion_models/ and use Nunchaku Qwen-Image DiT "
                 f"Loader; {tag}; not on Hopper (H100/H200)",
                 f"nunchaku: NunchakuQwenImageTransformer2DModel.from_pretrained('{out}'), then "
                 "QwenImagePipeline.from_pretrained('Qwen/Qwen-Image', transformer=transformer)"]
    else:
        lines = [f"diffusers: QwenImageTransformer2DModel.from_pretrained('{out}', torch_dtype=torch.bfloat16) "
                 "(quant_method nunchaku_lite: pip install kernels, DIFFUSERS_TRUST_REMOTE_KERNELS=true); "
                 f"{tag}; not on Hopper"]
    if r["variant"] == "qwen-image-edit-2511":
        lines.append("Edit-2511 (zero_cond_t): diffusers' QwenImageTransformer2DModel runs it; ComfyUI-nunchaku "
                     "does not handle the index_timestep_zero reference method (its PR #790 was not merged): "
                     "check your nunchaku version before relying on it")
    lines.append(f"check it without a GPU: qconvert verify {out} --reference SOURCE --report DIR")
    return lines


def format_report(r: dict) -> str:
    head = (f"{r['format']} {r['precision']} rank {r['rank']} ({r['variant']}), calibration: "
            f"{r['calibration']}, smoothing grid {r['grid']}")
    lines = [head, f"  {r['tensor_count']} tensors, {r['bytes']:,} bytes ({r['bytes'] / 1e9:.2f} GB)"]
    if not r["written"]:
        return "\n".join(lines + ["dry run: nothing written"])
    lines.append(f"  layer output error on the calibration rows: {r['mean_layer_error']:.3g} mean (plain 4-bit "
                 f"rounding: {r['mean_plain_error']:.3g}), in {r['seconds']} s")
    lines.append(f"wrote {r['output']}")
    return "\n".join(lines + ["  " + h for h in load_hints(r)])


# ------------------------------------------------------------- the command

SUMMARY = help_text("to-svdquant", """\
LoRAs given with --lora are baked at full precision before smoothing and SVD.  The default name is
svdq-{int4|fp4}_r{RANK}-MODEL.safetensors (a folder without the suffix for --layout diffusers).

\b
qconvert calibrate ./qwen-image --embeds prompts/*.safetensors -o calib.safetensors
qconvert to-svdquant ./qwen-image --precision int4 --rank 32 --calib calib.safetensors
qconvert to-svdquant ./qwen-image --lora Qwen-Image-Lightning-4steps-V1.0.safetensors --precision nvfp4 --rank 128
""")


@dataclass(frozen=True)
class SvdquantCommandOptions:
    precision: str = option("int4", choices=layout.PRECISIONS, help="int4: RTX 20/30/40; nvfp4: RTX 50 (Blackwell).")
    rank: int = option(32, help="Low-rank branch rank (multiple of 16; Nunchaku ships 32 and 128).")
    calib: Path | None = option(None, kind=Path, show_default=False,
                                help="Statistics from qconvert calibrate (absmax and sampled input rows); without it "
                                     "a short calibration on synthetic prompts runs first.")
    layout: str = option("nunchaku", choices=layout.LAYOUTS,
                         help="nunchaku: one .safetensors for ComfyUI-nunchaku and nunchaku's diffusers model.  "
                              "diffusers: a transformer folder for diffusers' own nunchaku_lite quantizer.")
    grid: int = option(20, help="Smoothing search grid (DeepCompressor's num_grids; 10 halves the time).")
    lora_mode: str = option("bake", choices=("bake", "lowrank"),
                            help="bake: merge the LoRAs at full precision, then quantize.  lowrank: quantize the base "
                                 "and append the LoRAs to the low-rank branch (rank grows by theirs).")


def run(source: Source, o: SvdquantCommandOptions, output=None, *, dry_run: bool = False, quiet: bool = False,
        echo: Callable[[str], None] = silent) -> Result:
    options = SvdqOptions(precision=o.precision, rank=o.rank, layout=o.layout, grid=o.grid, calib=o.calib,
                          lora_mode=o.lora_mode)
    with source.open() as src:
        report = convert(src, output, options, device=source.device, dry_run=dry_run, quiet=quiet, echo=echo)
    summary = {k: v for k, v in report.items() if k != "layers"}
    return Result(summary, format_report(report), [Path(report["output"])])


def demo_step(model: Path, out: Path, quiet: bool, echo: Callable[[str], None]) -> list[Path]:
    """``qconvert demo``: an INT4 rank-16 Nunchaku file of the tiny model (a quick search), and where it loads."""
    options = SvdqOptions("int4", 16, grid=4, calib_prompts=1, calib_steps=2, calib_size=128)
    with Source(str(model)).open() as source:
        r = convert(source, Path(out) / default_name(source, options), options, quiet=True)
    echo(f"svdquant        {r['output']}  (INT4 rank 16, {r['bytes']:,} bytes; layer error {r['mean_layer_error']:.2g} "
         f"vs plain 4-bit {r['mean_plain_error']:.2g})")
    echo(f"                {load_hints(r)[0]}")
    return [Path(r["output"])]


CONVERTER = Converter("to-svdquant", SvdquantCommandOptions, run, SUMMARY, suffix=".safetensors", calibration="calib",
                      not_in_recipes=(("layout", "diffusers"),))
