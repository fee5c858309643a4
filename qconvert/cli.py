"""The ``qconvert`` command line: parse, call, report.  No conversion logic lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import QConvertError


def echo(text: str = "") -> None:
    """Print a result line; paths that are not UTF-8 come out as \\xNN, never as an encoding error."""
    from .untrusted import unicode_text

    click.echo(unicode_text(str(text)))


def emit_json(obj) -> None:
    echo(json.dumps(obj, indent=2, default=str))


def debug_option(f):
    # Accepted on every command as well as before it; main() reads it from argv
    # so that even errors raised while parsing honour it.
    return click.option("--debug", is_flag=True, expose_value=False, help="Show tracebacks.")(f)


def quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars or chatter.")(f)


def converter_options(f):
    """The options every converter shares (DESIGN.md): -o, --dry-run, --json, --device, --lora, ..."""
    for opt in reversed([
        click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
                     help="Output file (or folder, for several files)."),
        click.option("--dry-run", is_flag=True, help="Plan only: print types and exact sizes, write nothing."),
        click.option("--json", "as_json", is_flag=True, help="Print the plan/result as one JSON object on stdout."),
        click.option("--device", default="cpu", show_default=True, help="Where to compute: cpu, cuda, cuda:1 ..."),
        click.option("--lora", "loras", multiple=True, metavar="FILE[:STRENGTH]",
                     help="Merge a LoRA before converting (repeatable)."),
        click.option("--ignore-unmatched", is_flag=True, help="Warn instead of failing on LoRA keys that match no weight."),
        click.option("--allow-extra", is_flag=True, help="Carry tensors outside the model through unchanged."),
        quiet_option,
        debug_option,
    ]):
        f = opt(f)
    return f


def open_source(source: str, *, loras=(), ignore_unmatched: bool = False, allow_extra: bool = False,
                device: str | None = None):
    """The checkpoint, seen through any LoRAs: every converter gets --lora for free."""
    from .checkpoint import open_checkpoint

    ckpt = open_checkpoint(source, allow_extra=allow_extra)
    if not loras:
        return ckpt
    from .lora import with_loras

    return with_loras(ckpt, loras, ignore_unmatched=ignore_unmatched, device=device)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="qconvert")
@debug_option
def cli() -> None:
    """Quantize Qwen-Image transformers into files that load everywhere."""


@cli.command("make-tiny")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--layers", default=3, show_default=True, help="Transformer blocks.")
@click.option("--heads", default=2, show_default=True, help="Attention heads.")
@click.option("--head-dim", default=128, show_default=True, help="Head dimension (multiple of 16).")
@click.option("--text-dim", default=256, show_default=True, help="Text-encoder hidden size (joint_attention_dim).")
@click.option("--seed", default=0, show_default=True, help="Weights seed.")
@click.option("--variant", type=click.Choice(["qwen-image", "edit-2511", "layered"]), default="qwen-image",
              show_default=True)
@click.option("--single-file", is_flag=True, help="Write one ComfyUI-style .safetensors instead of a diffusers folder.")
@click.option("--full-size", is_flag=True, help="The real 60-layer, 20.4B-parameter layout (needs --sparse).")
@click.option("--sparse", is_flag=True, help="With --full-size: true headers, data left as file holes.")
@click.option("--vae", is_flag=True, help="Add a tiny vae/ (diffusers' AutoencoderKLQwenImage; needs diffusers), "
              "so verify decodes pixels.")
@quiet_option
@debug_option
def make_tiny_cmd(out, layers, heads, head_dim, text_dim, seed, variant, single_file, full_size, sparse, vae, quiet):
    """Write a test model: tiny and trained-looking, or full-size and sparse.

    \b
    qconvert make-tiny ./tiny-qwen
    qconvert make-tiny ./tiny-qwen --vae
    qconvert make-tiny ./qwen-full --full-size --sparse
    """
    from . import tiny

    if vae and (single_file or full_size):
        raise click.UsageError("--vae adds a vae/ to a tiny diffusers repo; drop --single-file/--full-size")
    if full_size != sparse:
        raise click.UsageError("--full-size and --sparse go together (41 GB of real data is not a test model)")
    if full_size:
        if single_file:
            raise click.UsageError("--full-size writes the diffusers layout; drop --single-file")
        path = tiny.make_full_size_sparse(out, variant=variant)
    elif single_file:
        path = tiny.make_tiny_single_file(out, layers=layers, heads=heads, head_dim=head_dim, text_dim=text_dim,
                                          seed=seed, variant=variant)
    else:
        path = tiny.make_tiny(out, layers=layers, heads=heads, head_dim=head_dim, text_dim=text_dim, seed=seed,
                              variant=variant)
        if vae:
            tiny.add_tiny_vae(path, seed=seed)
    if not quiet:
        echo(f"wrote {path}")


@cli.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@debug_option
def inspect_cmd(path, as_json):
    """What a checkpoint or output contains (diffusers folder, .safetensors, .gguf).

    \b
    qconvert inspect ./tiny-qwen
    qconvert inspect qwen-image-Q4_K_M.gguf --json
    """
    from .inspection import format_summary, inspect_path

    summary = inspect_path(path)
    if as_json:
        emit_json(summary)
    else:
        echo(format_summary(summary))


@cli.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("qconvert-demo"), show_default=True,
              help="Folder for the tiny model and every output.")
@quiet_option
@debug_option
def demo_cmd(out, quiet):
    """Make a tiny model and run every conversion on it, saying how to load each file."""
    from .demo import run_demo

    run_demo(out, quiet=quiet, echo=echo)


# ---- converters register below (one section each) ----

# [to-gguf]

@cli.command("to-gguf")
@click.argument("source")
@click.option("--level", required=True, metavar="LEVEL",
              help="BF16, F16, Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q5_1, Q5_0, Q4_K_M, Q4_K_S, Q4_1, Q4_0, Q3_K_M, "
                   "Q3_K_S, Q2_K, all, or a list (Q8_0,Q4_K_M): several levels read the source once.")
@click.option("--policy", type=click.Choice(["city96", "quantstack", "uniform"]), default="city96",
              show_default=True,
              help="Per-tensor types: city96's published files, QuantStack's (blocks 0/last at Q5_K), "
                   "or every block linear at the level's base type.")
@click.option("--minimal-metadata", is_flag=True,
              help="Only general.architecture, quantization_version and file_type (no qconvert.* provenance).")
@click.option("--imatrix", type=click.Path(path_type=Path), default=None,
              help="A calibration file from qconvert calibrate: the block types weight their rounding error by "
                   "each input channel's mean square, as llama-quantize --imatrix does.")
@converter_options
def to_gguf_cmd(source, level, policy, minimal_metadata, imatrix, output, dry_run, as_json, device, loras,
                ignore_unmatched, allow_extra, quiet):
    """GGUF for ComfyUI-GGUF and diffusers, at one llama.cpp level or all of them.

    Files are named MODEL-LEVEL.gguf (qwen-image-Q4_K_M.gguf) in the current folder; -o is the file for one
    level and the folder for all.  Provenance goes in qconvert.* keys unless --minimal-metadata.  ComfyUI: put
    the file in ComfyUI/models/diffusion_models/ and load it with ComfyUI-GGUF's Unet Loader (GGUF).  diffusers:
    QwenImageTransformer2DModel.from_single_file(FILE, quantization_config=GGUFQuantizationConfig(...),
    config="Qwen/Qwen-Image", subfolder="transformer").

    \b
    qconvert to-gguf Qwen/Qwen-Image --level Q4_K_M
    qconvert to-gguf ./qwen-image --level all -o gguf/ --dry-run
    """
    from .formats.gguf import writer
    from .formats.gguf.policy import expand_levels

    try:
        levels = expand_levels(level)
    except QConvertError as exc:
        raise click.UsageError(str(exc)) from None
    with open_source(source, loras=loras, ignore_unmatched=ignore_unmatched, allow_extra=allow_extra,
                     device=device) as src:
        paths = writer.output_paths(src.name, levels, output)
        importance, record = None, None
        if imatrix is not None:
            from .calibrate.stats import read_imatrix
            from .io import file_sha256

            importance = read_imatrix(imatrix, src)
            record = f"{imatrix.name} sha256:{file_sha256(imatrix)}"
        plans = writer.plan_files(src, levels, policy=policy, minimal_metadata=minimal_metadata,
                                  dry_run=dry_run, imatrix=record)
        if not dry_run:
            writer.write_gguf(src, plans, paths, device=device, quiet=quiet or as_json, imatrix=importance)
        hints = writer.load_hints(paths[-1], src)
    if as_json:
        emit_json(writer.report_json(plans, paths, written=not dry_run))
    elif dry_run:
        echo("\n".join(writer.format_plan(plan, path) for plan, path in zip(plans, paths)))
    elif not quiet:
        for plan, path in zip(plans, paths):
            echo(f"wrote {path}  ({plan.level}, {plan.bytes:,} bytes)")
        echo("\n".join("  " + line for line in hints))


# [to-fp8]

@cli.command("to-fp8")
@click.argument("source")
@click.option("--format", "layout", type=click.Choice(["comfy", "scaled", "plain"]), default="comfy",
              show_default=True,
              help="comfy: ComfyUI's per-layer layout (weight + weight_scale + comfy_quant), block linears in FP8, "
                   "the rest BF16.  scaled: the legacy scaled_fp8/scale_weight layout for ComfyUI without "
                   "comfy_quant support (e4m3fn only; every linear in FP8, as old ComfyUI stores them).  "
                   "plain: every tensor cast unscaled, keys sorted, no metadata (Comfy-Org's "
                   "qwen_image_fp8_e4m3fn layout; no provenance; runtime LoRAs may show grid artifacts).")
@click.option("--dtype", type=click.Choice(["e4m3fn", "e5m2"]), default="e4m3fn", show_default=True,
              help="FP8 type: e4m3fn (more precision) or e5m2 (more range).")
@click.option("--keep", multiple=True, metavar="GROUP[,GROUP]",
              help="comfy only: keep these block-linear groups in BF16, e.g. mod (img_mod/txt_mod, a third "
                   "of the model and the most sensitive), attn, mlp, qkv, v, mlp_down, or one role like txt_mod.")
@click.option("--activations", type=click.Choice(["full-precision", "calibrated", "unit"]), default="full-precision",
              show_default=True,
              help="comfy only: how ComfyUI treats each layer's input on FP8 GPUs.  full-precision: a BF16 matmul "
                   "(safe, Comfy-Org's choice).  calibrated: an FP8 matmul with input_scale from --calib.  unit: "
                   "no scale (inputs beyond 448 saturate; the layout qconvert wrote before).")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="With --activations calibrated: statistics from qconvert calibrate.")
@click.option("--margin", default=1.25, show_default=True,
              help="With --activations calibrated: input_scale = margin * calibrated amax / 448.")
@converter_options
def to_fp8_cmd(source, layout, dtype, keep, activations, calib, margin, output, dry_run, as_json, device, loras,
               ignore_unmatched, allow_extra, quiet):
    """FP8 safetensors for ComfyUI (and diffusers, through qconvert's dequantizing loader).

    The default output name is SOURCE-fp8mixed-e4m3fn.safetensors (comfy), -fp8-e4m3fn-scaled (scaled) or
    -fp8-e4m3fn (plain), in the current folder or in -o when -o is a folder.  ComfyUI: put the file in
    ComfyUI/models/diffusion_models/ and use Load Diffusion Model.  diffusers: load_dequantized() in
    qconvert.formats.fp8 turns any of the layouts into a BF16 state dict for from_single_file.

    \b
    qconvert to-fp8 Qwen/Qwen-Image
    qconvert to-fp8 ./qwen-image --keep mod -o out/
    qconvert to-fp8 ./qwen-image --format plain --dry-run --json
    """
    from .formats import fp8

    try:
        options = fp8.make_options(layout, dtype, keep, activations, margin)
    except QConvertError as exc:
        raise click.UsageError(str(exc)) from None
    if (activations == "calibrated") != (calib is not None):
        raise click.UsageError("--activations calibrated and --calib FILE go together")
    with open_source(source, loras=loras, ignore_unmatched=ignore_unmatched, allow_extra=allow_extra,
                     device=device) as src:
        if calib is not None:
            options = fp8.with_input_scales(options, src, calib)
        report = fp8.convert(src, output, options, device=device, dry_run=dry_run, quiet=quiet or as_json)
    if as_json:
        emit_json(report)
    elif dry_run or not quiet:
        echo(fp8.format_report(report))


# [to-comfy]

@cli.command("to-comfy")
@click.argument("source")
@click.option("--format", "fmt", type=click.Choice(["fp8", "nvfp4", "mxfp8", "int8", "int8-row", "int8-tensor",
                                                   "convrot-w4a4", "mix"]),
              default="nvfp4", show_default=True,
              help="nvfp4 (RTX 50), mxfp8 (Blackwell), int8 (row-wise with ConvRot; int8-row, int8-tensor "
                   "without), convrot-w4a4 (experimental), mix (see --target-size), fp8 (= to-fp8 --format comfy).")
@click.option("--keep", multiple=True, metavar="GROUP[,GROUP]", help="Keep these block-linear groups in BF16.")
@click.option("--target-size", type=float, default=None, help="mix: the file's size in GB; each linear gets the "
              "format (BF16, FP8, MXFP8, INT8, NVFP4) that keeps the summed error least within it.")
@click.option("--max-error", type=float, default=None, help="mix: the largest mean layer error; the smallest file "
              "that keeps it.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="mix, weight measure: weight each layer's error by its inputs' mean squares from qconvert "
                   "calibrate.")
@click.option("--sensitivity", "measure", type=click.Choice(["block", "weight"]), default=None,
              help="mix: block (default): the error each layer's format causes in its block's output on a short "
              "reference run, which sees which layers matter; weight (default with --calib): each layer's weight "
              "error, about half the time.")
@converter_options
def to_comfy_cmd(source, fmt, keep, target_size, max_error, calib, measure, output, dry_run, as_json, device, loras,
                 ignore_unmatched, allow_extra, quiet):
    """ComfyUI per-layer quantized safetensors: NVFP4, MXFP8, INT8 with ConvRot (and FP8), byte for byte
    what comfy-kitchen's quantizers make, streamed tensor by tensor.

    \b
    qconvert to-comfy ./qwen-image --format nvfp4
    qconvert to-comfy ./qwen-image --format int8 --lora lightning.safetensors
    qconvert to-comfy ./qwen-image --format mxfp8 --keep mod --dry-run --json
    qconvert to-comfy ./qwen-image --format mix --target-size 16
    """
    if (fmt == "mix") != ((target_size is None) != (max_error is None)):
        raise click.UsageError("--format mix takes one of --target-size GB or --max-error X (and only mix does)")
    if fmt == "fp8":
        ctx = click.get_current_context()
        ctx.invoke(to_fp8_cmd, source=source, layout="comfy", dtype="e4m3fn", keep=keep, activations="full-precision",
                   calib=None, margin=1.25, output=output, dry_run=dry_run, as_json=as_json, device=device,
                   loras=loras, ignore_unmatched=ignore_unmatched, allow_extra=allow_extra, quiet=quiet)
        return
    from .formats import comfy

    try:
        options = comfy.make_options("nvfp4" if fmt == "mix" else fmt, keep)
    except QConvertError as exc:
        raise click.UsageError(str(exc)) from None
    lines = []
    with open_source(source, loras=loras, ignore_unmatched=ignore_unmatched, allow_extra=allow_extra,
                     device=device) as src:
        mix = None
        if fmt == "mix":
            from .formats.comfy_mix import mixed_options

            say = (lambda m: None) if (quiet or as_json) else echo
            options, mix, lines = mixed_options(src, target_size=target_size, max_error=max_error, calib=calib,
                                                keep=options.keep, device=device, echo=say, measure=measure)
        report = comfy.convert(src, output, options, device=device, dry_run=dry_run, quiet=quiet or as_json)
        if mix is not None:
            report["mix"] = mix
    if as_json:
        emit_json(report)
    elif dry_run or not quiet:
        if mix is not None:
            echo(f"mix: {report['bytes'] / 1e9:.3f} GB, mean layer error {mix['mean_error']:.3g}; per layer:")
            echo("\n".join(lines))
        echo(comfy.format_report(report))


# [to-svdquant]

@cli.command("to-svdquant")
@click.argument("source")
@click.option("--precision", type=click.Choice(["int4", "nvfp4"]), default="int4", show_default=True,
              help="int4: RTX 20/30/40; nvfp4: RTX 50 (Blackwell).")
@click.option("--rank", default=32, show_default=True, help="Low-rank branch rank (multiple of 16; Nunchaku ships 32 "
              "and 128).")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Statistics from qconvert calibrate (absmax and sampled input rows); without it a short "
                   "calibration on synthetic prompts runs first.")
@click.option("--layout", type=click.Choice(["nunchaku", "diffusers"]), default="nunchaku", show_default=True,
              help="nunchaku: one .safetensors for ComfyUI-nunchaku and nunchaku's diffusers model.  diffusers: a "
                   "transformer folder for diffusers' own nunchaku_lite quantizer.")
@click.option("--grid", default=20, show_default=True, help="Smoothing search grid (DeepCompressor's num_grids; "
              "10 halves the time).")
@click.option("--lora-mode", type=click.Choice(["bake", "lowrank"]), default="bake", show_default=True,
              help="bake: merge the LoRAs at full precision, then quantize.  lowrank: quantize the base and append "
                   "the LoRAs to the low-rank branch (rank grows by theirs).")
@converter_options
def to_svdquant_cmd(source, precision, rank, calib, layout, grid, lora_mode, output, dry_run, as_json, device, loras,
                    ignore_unmatched, allow_extra, quiet):
    """SVDQuant 4-bit files (Nunchaku INT4/NVFP4), calibrated, one block in memory at a time.

    LoRAs given with --lora are baked at full precision before smoothing and SVD.  The default name is
    svdq-{int4|fp4}_r{RANK}-MODEL.safetensors (a folder without the suffix for --layout diffusers).

    \b
    qconvert calibrate ./qwen-image --embeds prompts/*.safetensors -o calib.safetensors
    qconvert to-svdquant ./qwen-image --precision int4 --rank 32 --calib calib.safetensors
    qconvert to-svdquant ./qwen-image --lora Qwen-Image-Lightning-4steps-V1.0.safetensors --precision nvfp4 --rank 128
    """
    from .svdquant.convert import SvdqOptions, convert, format_report

    options = SvdqOptions(precision=precision, rank=rank, layout=layout, grid=grid, calib=calib, lora_mode=lora_mode)
    with open_source(source, loras=loras, ignore_unmatched=ignore_unmatched, allow_extra=allow_extra,
                     device=device) as src:
        report = convert(src, output, options, device=device, dry_run=dry_run, quiet=quiet or as_json,
                         echo=echo)
    if as_json:
        emit_json({k: v for k, v in report.items() if k != "layers"})
    elif dry_run or not quiet:
        echo(format_report(report))


# [bake-lora]

@cli.command("bake-lora")
@click.argument("source")
@click.option("--rank", type=int, default=None, help="SVDQuant inputs: the output's rank (default: the input's).")
@converter_options
def bake_lora_cmd(source, rank, output, dry_run, as_json, device, loras, ignore_unmatched, allow_extra, quiet):
    """Merge LoRAs into the weights: a checkpoint in the source's dtype and layout.

    W' = W + strength * alpha/rank * up @ down, in float32, rounded once.
    A diffusers folder gives a diffusers folder, a single file a single file.
    An SVDQuant file gives an SVDQuant file: each LoRA joins the low-rank branch, which is recompressed to the
    file's rank (or --rank) by an exact SVD; no BF16 original is needed.

    \b
    qconvert bake-lora Qwen/Qwen-Image --lora Qwen-Image-Lightning-4steps-V1.0.safetensors -o qwen-image-lightning
    qconvert bake-lora qwen_image_bf16.safetensors --lora style.safetensors:0.8 --lora lightning.safetensors \\
        -o qwen_image_style_lightning_bf16.safetensors
    """
    from .bake import bake, bake_plan, bake_report, format_report
    from .svdquant.emulate import is_svdquant

    if not loras:
        raise click.UsageError("give at least one --lora FILE[:STRENGTH]")
    if is_svdquant(source):
        _bake_into_svdquant(source, loras, rank, output, dry_run, as_json, ignore_unmatched, quiet)
        return
    if rank is not None:
        raise click.UsageError("--rank applies to SVDQuant inputs only")
    with open_source(source, loras=loras, ignore_unmatched=ignore_unmatched, allow_extra=allow_extra,
                     device=device) as view:
        plan = bake_plan(view, output, options={"ignore_unmatched": ignore_unmatched}, dry_run=dry_run)
        if not dry_run:
            bake(view, plan, quiet=quiet or as_json)
        report = bake_report(view, plan, dry_run=dry_run)
    if as_json:
        emit_json(report)
    elif not quiet:
        echo(format_report(report))


def _bake_into_svdquant(source, loras, rank, output, dry_run, as_json, ignore_unmatched, quiet) -> None:
    from .svdquant.lora import bake_into_file

    if output is None:
        raise click.UsageError("give -o for the SVDQuant file with the LoRAs baked in")
    if dry_run:
        raise click.UsageError("--dry-run is not offered for SVDQuant inputs (the output is the input's size)")
    report = bake_into_file(source, loras, output, rank=rank, ignore_unmatched=ignore_unmatched,
                            quiet=quiet or as_json)
    if as_json:
        emit_json(report)
    elif not quiet:
        echo(f"wrote {report['output']}  ({report['format']} {report['precision']} rank {report['rank']}, "
             f"{report['bytes']:,} bytes)")


# sample, verify and calibrate live in cli_model.py, recipe and publish in cli_release.py; importing
# them registers them on ``cli``.
from . import cli_model, cli_release  # noqa: E402,F401


def _printable(exc: BaseException) -> str:
    """An error message fit for one terminal line: names from a hostile file may hold
    control characters, lone surrogates or megabytes of text."""
    from .untrusted import shown

    return shown(str(exc), 2000)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        rv = cli.main(args=argv, prog_name="qconvert", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors: click's message, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        if debug:
            raise
        click.echo("error: interrupted; no output was left half-written", err=True)
        sys.exit(130)
    except QConvertError as exc:
        if debug:
            raise
        click.echo(f"error: {_printable(exc)}", err=True)
        sys.exit(1)
    except Exception as exc:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            raise
        click.echo(f"error: internal error ({type(exc).__name__}: {_printable(exc)}); rerun with --debug and "
                   "report it", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
