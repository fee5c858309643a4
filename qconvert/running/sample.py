"""``qconvert sample``: the reference sampler on a checkpoint, latents to a safetensors file."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qconvert.core.errors import QConvertError
from qconvert.core.io import write_safetensors
from qconvert.core.pipeline import parse_device, provenance, provenance_json
from qconvert.running import inputs, sampler
from qconvert.running.model import QwenImageTransformer
from qconvert.running.providers import DenseProvider

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SampleOptions:
    height: int = 1024
    width: int = 1024
    steps: int = 50
    cfg: float = 4.0
    schedule: str = "qwen"
    seed: int = 0
    embeds: Path | None = None  # None: seeded synthetic embeddings
    noise: Path | None = None  # None: seeded noise
    image_latents: list = field(default_factory=list)  # Edit references
    device: str = "cpu"
    dtype: str | None = None  # default float32 on the CPU, bfloat16 on CUDA
    cache_gb: float = 0.0  # converted weights kept between steps (0: stream every block at every step)
    runtime: str = "native"  # verify: "native" quantizes inputs as the format's matmuls do; "dequantized" not
    # verify's samples: every prompt (these embeddings files, then held-out synthetic ones) with every seed
    # from ``seed`` on
    prompt_files: tuple = ()
    synthetic: int = 1
    seeds: int = 1

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_gb * 2 ** 30)

    def to_json(self) -> dict:
        return {"height": self.height, "width": self.width, "steps": self.steps, "cfg": self.cfg,
                "schedule": self.schedule, "seed": self.seed, "dtype": self.compute_dtype_name,
                "embeds": str(self.embeds) if self.embeds else "synthetic",
                "noise": str(self.noise) if self.noise else "seeded",
                "image_latents": [str(p) for p in self.image_latents]}

    @property
    def compute_dtype_name(self) -> str:
        return self.dtype or ("bfloat16" if str(self.device).startswith("cuda") else "float32")


def check_options(o: SampleOptions) -> None:
    inputs.check_size(o.height, o.width)
    if o.steps < 1 or o.steps > 1000:
        raise QConvertError(f"--steps {o.steps}: give 1 to 1000 steps")
    if o.schedule not in sampler.SCHEDULES:
        raise QConvertError(f"--schedule {o.schedule}: choose {' or '.join(sampler.SCHEDULES)}")
    if sampler.SCHEDULES[o.schedule].shift_terminal and o.steps < 2:
        # the stretch to the terminal sigma divides by (1 - last sigma), which is 0 for one step
        raise QConvertError(f"--steps {o.steps}: the {o.schedule} schedule needs at least 2 steps")
    if not (o.cfg >= 1.0 and o.cfg < 100):
        raise QConvertError(f"--cfg {o.cfg}: true CFG scales run from 1 (off) to under 100")
    if not 0 <= o.cache_gb <= 1 << 20:
        raise QConvertError(f"--cache-gb {o.cache_gb}: give the GiB of converted weights to keep (0 streams)")
    if o.runtime not in ("native", "dequantized"):
        raise QConvertError(f"--runtime {o.runtime}: choose native or dequantized")
    if o.compute_dtype_name not in DTYPES:
        raise QConvertError(f"--dtype {o.dtype}: choose {', '.join(DTYPES)}")


def placement(options: SampleOptions) -> tuple[torch.device, torch.dtype]:
    """Where the model computes, and in what (one line when CUDA is asked for but absent)."""
    return parse_device(options.device), DTYPES[options.compute_dtype_name]


def load_prompt(options: SampleOptions, config) -> inputs.Prompt:
    """The embeddings file given with --embeds, or seeded synthetic embeddings."""
    if options.embeds:
        return inputs.read_prompt(options.embeds, config)
    return inputs.synthetic_prompt(config, options.seed)


def run_sample(source, options: SampleOptions, output: str | os.PathLike, *, echo=print, quiet: bool = False) -> dict:
    """Sample with the reference model over ``source`` and write ``latents`` (packed) to ``output``."""
    check_options(options)
    config = source.config
    if config.use_layer3d_rope:
        raise QConvertError(f"{source.path}: a Qwen-Image-Layered model; qconvert sample runs the text-to-image "
                            "and Edit loops only (Layered's decomposition loop is not implemented)")
    device, dtype = placement(options)
    prompt = load_prompt(options, config)
    noise = (inputs.read_noise(options.noise, options.height, options.width) if options.noise
             else inputs.seeded_noise(options.seed, options.height, options.width))
    shapes = [(1, options.height // 16, options.width // 16)]
    refs = [inputs.read_image_latents(p) for p in options.image_latents]
    shapes += [shape for _, shape in refs]
    image_latents = torch.cat([lat for lat, _ in refs], dim=1).to(device, dtype) if refs else None
    cfg_runs = 2 if options.cfg > 1 and prompt.neg_embeds is not None else 1
    if not quiet:
        echo(f"sample: {options.steps} steps x {cfg_runs} model run(s) of {config.num_layers} blocks, "
             f"{options.height}x{options.width} ({noise.shape[1]} image tokens"
             + (f" + {image_latents.shape[1]} reference" if refs else "") + f"), {options.schedule} schedule, "
             f"{options.compute_dtype_name} on {device}")
    model = QwenImageTransformer(config, DenseProvider(source, dtype=dtype, device=device,
                                                       cache_bytes=options.cache_bytes))
    start = time.monotonic()

    def progress(i: int, total: int, _latents) -> None:
        if quiet:
            return
        took = time.monotonic() - start
        if i == 0 and total > 1:
            echo(f"  step 1/{total} took {took:.1f} s; about {took * total:.0f} s in all")

    prompt = prompt.to(device, dtype)
    with torch.no_grad():
        latents = sampler.sample(
            model, noise.to(device, dtype), prompt.embeds, prompt.mask, steps=options.steps,
            schedule=options.schedule, cfg=options.cfg, neg_text=prompt.neg_embeds, neg_mask=prompt.neg_mask,
            img_shapes=shapes, image_latents=image_latents, on_step=progress)
    info = provenance(source, fmt="latents", options=options.to_json())
    target = Path(output)
    write_safetensors(target, {"latents": latents.float().cpu()}, {"qconvert": provenance_json(info)})
    return {"command": "sample", "output": str(target), "shape": list(latents.shape),
            "seconds": round(time.monotonic() - start, 2), **options.to_json()}
