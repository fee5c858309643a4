"""``qconvert calibrate``: sample a few prompts with a recording provider, write the statistics."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from qconvert.core.errors import QConvertError
from qconvert.core.models import qwen_image as qi
from qconvert.core.pipeline import provenance, provenance_json
from qconvert.formats.calibration import Stat, write_calibration
from qconvert.running import inputs, sampler
from qconvert.running.model import QwenImageTransformer
from qconvert.running.providers import DenseProvider
from qconvert.running.sample import SampleOptions, check_options, placement


class RecordingProvider(DenseProvider):
    """A dense provider whose linears also record their inputs (rows of the last dimension).

    Every statistic is allocated up front, at its final size, and updated in
    place: allocated as the layers are first seen, the long-lived blocks land
    above the large temporaries and keep the allocator from returning them,
    so peak memory grew with the number of layers (by 10x the statistics'
    own size at 512²).
    """

    def __init__(self, source, *, keep_rows: int = 64, seed: int = 0, **kwargs):
        super().__init__(source, **kwargs)
        self.keep_rows = keep_rows
        self.generator = torch.Generator().manual_seed(seed)
        self.stats: dict[str, Stat] = {}
        for name, shape in source.shapes().items():
            if qi.is_known(name) and name.endswith(".weight") and len(shape) == 2:
                width = shape[1]
                self.stats[name[:-len(".weight")]] = Stat(torch.zeros(width, dtype=torch.float64),
                                                          torch.zeros(width), torch.zeros(keep_rows, width))

    def recorded(self) -> dict[str, Stat]:
        """The statistics of every layer that saw input."""
        return {m: s for m, s in self.stats.items() if s.seen}

    def linear(self, module: str):
        inner = super().linear(module)

        def run(x: torch.Tensor) -> torch.Tensor:
            self._record(module, x.detach().reshape(-1, x.shape[-1]))
            return inner(x)
        return run

    def _record(self, module: str, x: torch.Tensor) -> None:
        stat = self.stats[module]
        n, k = x.shape[0], self.keep_rows
        xf = x.float()
        stat.sq_sum += torch.sum(xf * xf, dim=0, dtype=torch.float64).cpu()
        torch.maximum(stat.absmax, xf.abs().amax(0).cpu(), out=stat.absmax)
        # Reservoir sampling (Algorithm R): every row seen has the same chance to be kept; memory stays bounded.
        room = max(0, k - stat.seen)
        take = min(room, n)
        stat.buffer[stat.seen:stat.seen + take] = xf[:take].cpu()
        if n > room:
            index = torch.arange(stat.seen + room, stat.seen + n)
            slots = (torch.rand(n - room, generator=self.generator, dtype=torch.float64) * (index + 1)).long()
            hits = (slots < k).nonzero().flatten().tolist()
            for i in hits:  # in order: a later row replaces an earlier one in the same slot
                stat.buffer[int(slots[i])] = xf[room + i].cpu()
        stat.seen += n


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
    edit = inputs.takes_references(source)  # an Edit model's inputs are its users': beside a reference image
    shapes = inputs.image_shapes(options.height, options.width, edit)
    runs = len(loaded) * options.steps * (2 if options.cfg > 1 else 1)
    echo(f"calibrate: {len(loaded)} prompt(s) x {options.steps} steps = {runs} model runs of {config.num_layers} "
         f"blocks at {options.height}x{options.width}" + (", each beside a synthetic reference image" if edit else ""))
    start = time.monotonic()
    with torch.no_grad():
        for i, prompt in enumerate(loaded):
            noise = inputs.seeded_noise(options.seed + i, options.height, options.width)
            reference = inputs.synthetic_reference(options.seed + i, options.height, options.width) if edit else None
            prompt = prompt.to(device, dtype)
            sampler.sample(model, noise.to(device, dtype), prompt.embeds, prompt.mask, steps=options.steps,
                           schedule=options.schedule, cfg=options.cfg, img_shapes=shapes,
                           neg_text=prompt.neg_embeds, neg_mask=prompt.neg_mask,
                           image_latents=None if reference is None else reference.to(device, dtype))
            if i == 0 and len(loaded) > 1:
                took = time.monotonic() - start
                echo(f"  prompt 1/{len(loaded)} took {took:.1f} s; about {took * len(loaded):.0f} s in all")
    return provider.recorded(), {**options.to_json(), "prompts": len(loaded), "keep_rows": keep_rows,
                                 **({"references": "synthetic"} if edit else {})}
