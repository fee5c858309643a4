"""``qconvert calibrate``: sample a few prompts with a recording provider, write the statistics."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import QConvertError
from ..pipeline import provenance, provenance_json
from ..verify import inputs, sampler
from ..verify.commands import SampleOptions, check_options, placement
from ..verify.model import QwenImageTransformer
from .stats import RecordingProvider, write_calibration


def run_calibrate(source, options: SampleOptions, prompts: list, synthetic: int, output, *, keep_rows: int = 64,
                  echo=print) -> dict:
    """``prompts``: embeddings files; ``synthetic``: how many seeded prompts to add (seeds seed, seed+1, ...)."""
    start = time.monotonic()
    stats, settings = collect(source, options, prompts, synthetic, keep_rows=keep_rows, echo=echo)
    info = provenance(source, fmt="calibration", options=settings)
    write_calibration(Path(output), stats, {"qconvert": provenance_json(info)})
    return {"command": "calibrate", "output": str(output), "layers": len(stats),
            "seconds": round(time.monotonic() - start, 2), "beyond_fp8": beyond_fp8(stats), **settings}


FP8_E4M3_MAX = 448.0


def beyond_fp8(stats: dict) -> list[str]:
    """Block linears whose input reached beyond ±448: an FP8 (e4m3fn) activation with scale 1.0, which
    ComfyUI uses when a layer has no input_scale, saturates there (spec comfy-quant.md §2.2)."""
    return sorted(m for m, s in stats.items() if m.startswith("transformer_blocks.")
                  and float(s.absmax.max()) > FP8_E4M3_MAX)


def collect(source, options: SampleOptions, prompts: list, synthetic: int, *, keep_rows: int = 64,
            echo=print) -> tuple[dict, dict]:
    """Sample the prompts with a recording provider: ({module: Stat}, the settings used)."""
    check_options(options)
    if not prompts and synthetic < 1:
        raise QConvertError("calibrate: give --embeds FILE (repeatable) or --synthetic N")
    if not 1 <= keep_rows <= 4096:
        raise QConvertError(f"--keep-rows {keep_rows}: keep 1 to 4096 sampled input rows per layer")
    device, dtype = placement(options)
    config = source.config
    loaded = [inputs.read_prompt(p, config) for p in prompts]  # all checked before any work
    loaded += [inputs.synthetic_prompt(config, options.seed + i) for i in range(synthetic)]
    provider = RecordingProvider(source, keep_rows=keep_rows, seed=options.seed, dtype=dtype, device=device,
                                 cache_bytes=options.cache_bytes)
    model = QwenImageTransformer(config, provider)
    shapes = [(1, options.height // 16, options.width // 16)]
    runs = len(loaded) * options.steps * (2 if options.cfg > 1 else 1)
    echo(f"calibrate: {len(loaded)} prompt(s) x {options.steps} steps = {runs} model runs of {config.num_layers} "
         f"blocks at {options.height}x{options.width}")
    start = time.monotonic()
    with torch.no_grad():
        for i, prompt in enumerate(loaded):
            noise = inputs.seeded_noise(options.seed + i, options.height, options.width)
            prompt = prompt.to(device, dtype)
            sampler.sample(model, noise.to(device, dtype), prompt.embeds, prompt.mask, steps=options.steps,
                           schedule=options.schedule, cfg=options.cfg, img_shapes=shapes,
                           neg_text=prompt.neg_embeds, neg_mask=prompt.neg_mask)
            if i == 0 and len(loaded) > 1:
                took = time.monotonic() - start
                echo(f"  prompt 1/{len(loaded)} took {took:.1f} s; about {took * len(loaded):.0f} s in all")
    return provider.recorded(), {**options.to_json(), "prompts": len(loaded), "keep_rows": keep_rows}
