"""The commands that run the model: sample and verify (registered on ``cli.group.cli``)."""

from __future__ import annotations

from pathlib import Path

import click

from qconvert.cli.group import cli
from qconvert.cli.options import converter_options, debug_option, echo, emit_json, open_source, quiet_option
from qconvert.running.defaults import VERIFY

_cache_option = click.option("--cache-gb", type=float, default=0.0, show_default=True,
                             help="Keep this many GiB of converted weights between steps (the first blocks that "
                                  "fit); 0 streams every block at every step.  As fast as holding the model when "
                                  "it all fits.")


# [sample]

@cli.command("sample")
@click.argument("source")
@click.option("--embeds", type=click.Path(path_type=Path), default=None,
              help="safetensors with prompt_embeds [1, L, text_dim] and prompt_embeds_mask [1, L] "
                   "(and negative_prompt_embeds/_mask for CFG), as diffusers' encode_prompt returns them.")
@click.option("--synthetic-embeds", is_flag=True, help="Seeded stand-in embeddings (no text encoder needed).")
@click.option("--height", default=1024, show_default=True, help="Image height in pixels (multiple of 16).")
@click.option("--width", default=1024, show_default=True, help="Image width in pixels (multiple of 16).")
@click.option("--steps", default=50, show_default=True)
@click.option("--cfg", default=4.0, show_default=True, help="True CFG scale; 1 turns it off.")
@click.option("--schedule", type=click.Choice(sorted(["qwen", "lightning"])), default="qwen", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed for the noise (and synthetic embeddings).")
@click.option("--noise", type=click.Path(path_type=Path), default=None,
              help="safetensors with noise [1, (H/16)*(W/16), 64] instead of seeded noise.")
@click.option("--image-latents", multiple=True, type=click.Path(path_type=Path),
              help="Edit: safetensors with image_latents [1, 16, h, w] of a reference image (repeatable).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Compute dtype (default float32 on the CPU, bfloat16 on CUDA).")
@_cache_option
@converter_options
def sample_cmd(source, embeds, synthetic_embeds, height, width, steps, cfg, schedule, seed, noise, image_latents,
               dtype, cache_gb, output, dry_run, as_json, device, loras, ignore_unmatched, allow_extra, quiet):
    """Denoise with the reference model: packed latents [1, (H/16)*(W/16), 64] to a safetensors file.

    \b
    qconvert sample ./qwen-image --embeds prompt.safetensors --steps 50 --cfg 4 -o latents.safetensors
    qconvert sample ./qwen-image --lora lightning.safetensors --schedule lightning --steps 4 --cfg 1 \\
        --synthetic-embeds -o lightning.safetensors
    """
    from qconvert.running.sample import SampleOptions, run_sample

    if (embeds is None) == (not synthetic_embeds):
        raise click.UsageError("give --embeds FILE or --synthetic-embeds")
    target = _safetensors_output(output, "latents.safetensors")
    options = SampleOptions(height=height, width=width, steps=steps, cfg=cfg, schedule=schedule, seed=seed,
                            embeds=embeds, noise=noise, image_latents=list(image_latents), device=device,
                            dtype=dtype, cache_gb=cache_gb)
    if dry_run:
        from qconvert.running.sample import check_options

        check_options(options)
        result = {"command": "sample", "dry_run": True, "output": str(target), **options.to_json()}
    else:
        with open_source(source, loras=loras, ignore_unmatched=ignore_unmatched, allow_extra=allow_extra,
                         device=device) as src:
            result = run_sample(src, options, target, echo=lambda m: echo(m) if not as_json else None,
                                quiet=quiet or as_json)
    if as_json:
        emit_json(result)
    elif not quiet:
        echo(f"{'would write' if dry_run else 'wrote'} {target}" + ("" if dry_run else
             f"  (latents {result['shape']}, {result['seconds']} s)"))


# [verify]

@cli.command("verify")
@click.argument("output")
@click.option("--reference", required=True, help="The source the output was made from (with the same --lora).")
@click.option("--report", "report_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for report.json and report.md (written whole or not at all).")
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="A report.json to gate on: exit 1 when a figure is worse beyond --tolerance.")
@click.option("--tolerance", default=0.05, show_default=True, help="How much worse than the baseline a figure may "
              "be, as a fraction of the baseline's value.")
@click.option("--embeds", type=click.Path(path_type=Path), multiple=True,
              help="Prompt embeddings (as for sample); repeatable: each is one prompt.")
@click.option("--synthetic", type=int, default=None,
              help=f"Seeded synthetic prompts, never the ones calibration or the mix measure on  [default: "
                   f"{VERIFY['synthetic']} without --embeds, else 0]")
@click.option("--seeds", type=int, default=VERIFY["seeds"], show_default=True,
              help="Noise seeds per prompt, from --seed on; every prompt runs with every seed.")
@click.option("--height", default=VERIFY["height"], show_default=True)
@click.option("--width", default=VERIFY["width"], show_default=True)
@click.option("--steps", default=VERIFY["steps"], show_default=True)
@click.option("--cfg", default=VERIFY["cfg"], show_default=True)
@click.option("--schedule", type=click.Choice(["qwen", "lightning"]), default=VERIFY["schedule"], show_default=True)
@click.option("--seed", default=VERIFY["seed"], show_default=True, help="The first noise seed.")
@click.option("--max-minutes", type=float, default=None,
              help="Stop measuring after this long and write a report marked partial (never gated).")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:STRENGTH]", help="LoRAs the output was baked with.")
@click.option("--ignore-unmatched", is_flag=True, help="Warn instead of failing on unmatched LoRA keys.")
@click.option("--vae", type=click.Path(path_type=Path), default=None,
              help="A diffusers vae/ folder to decode both runs with (default: the reference repo's vae/).")
@click.option("--no-decode", is_flag=True, help="Latent figures only; do not decode with the VAE.")
@click.option("--runtime", type=click.Choice(["native", "dequantized"]), default=VERIFY["runtime"], show_default=True,
              help="ComfyUI formats: native quantizes each layer's input as its FP8/FP4/INT8 matmul does (an RTX "
                   "40/50 GPU); dequantized runs BF16 matmuls (GPUs without them, or full-precision layers).")
@click.option("--device", default="cpu", show_default=True, help="Where to run the model: cpu, cuda, cuda:1 ...")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Compute dtype (default float32 on the CPU, bfloat16 on CUDA).")
@_cache_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@quiet_option
@debug_option
def verify_cmd(output, reference, report_dir, baseline, tolerance, embeds, synthetic, seeds, height, width, steps, cfg,
               schedule, seed, max_minutes, loras, ignore_unmatched, vae, no_decode, runtime, device, dtype, cache_gb,
               as_json, quiet):
    """Measure an output against its source: per-layer weight error, end-to-end figures over prompts x seeds
    with 95% intervals; gate on a baseline.

    \b
    qconvert verify qwen-image-Q4_K_M.gguf --reference Qwen/Qwen-Image --report reports/Q4_K_M
    qconvert verify out.gguf --reference ./qwen-image --report r/ --synthetic 8 --seeds 3
    qconvert verify out.gguf --reference ./qwen-image --report r/ --baseline main/report.json
    """
    from qconvert.running.report import shown
    from qconvert.running.sample import SampleOptions
    from qconvert.running.verify import run_verify

    if not 0 <= tolerance < 10:
        raise click.UsageError(f"--tolerance {tolerance}: give a fraction such as 0.05")
    if max_minutes is not None and not max_minutes > 0:
        raise click.UsageError(f"--max-minutes {max_minutes}: give a positive number of minutes")
    if synthetic is None:
        synthetic = 0 if embeds else VERIFY["synthetic"]
    options = SampleOptions(height=height, width=width, steps=steps, cfg=cfg, schedule=schedule, seed=seed,
                            prompt_files=tuple(embeds), synthetic=synthetic, seeds=seeds, device=device, dtype=dtype,
                            cache_gb=cache_gb, runtime=runtime)
    with open_source(reference, loras=loras, ignore_unmatched=ignore_unmatched) as ref:
        say = (lambda m: None) if (quiet or as_json) else echo
        result = run_verify(output, ref, options, report_dir, baseline=baseline, tolerance=tolerance,
                            max_minutes=max_minutes, vae=vae, decode=not no_decode, echo=say)
    if as_json:
        emit_json({k: v for k, v in result.items() if k not in ("per_layer", "per_block")})
    elif not quiet:
        lat, w, px = result["latents"], result["weights"], result["pixels"]
        if px:
            echo(f"pixels: PSNR {shown(px, 'psnr_db', 2, ' dB')}, SSIM {shown(px, 'ssim', 4)}"
                 + (f", LPIPS {shown(px, 'lpips', 4)}" if px["lpips"] is not None else ""))
        if lat:
            echo(f"latents: PSNR {shown(lat, 'psnr_db', 2, ' dB')}, SSIM {shown(lat, 'ssim', 4)}"
                 + (f"; {lat['samples']} samples" if lat["samples"] > 1 else ""))
        if w:
            echo(f"weights: worst relative RMSE {w['worst_rel_rmse']:.4g} ({w['worst_layer']}), mean "
                 f"{w['changed_mean_rel_rmse']:.4g} over the {w['changed_tensors']} tensors the output changes")
        partial = "" if result["complete"] else " (partial: --max-minutes reached)"
        echo(f"wrote {report_dir}/report.json and report.md{partial}")


def _safetensors_output(output, default: str) -> Path:
    """``-o`` (or ``default``) for commands that write one .safetensors file."""
    from qconvert.converters.base import UsageError
    from qconvert.converters.calibrate import safetensors_output

    try:
        return safetensors_output(output, default)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
