"""``qconvert verify``: how faithful an output is to its source, as a report CI can gate on.

Two measurements, both against the reference (the source through the same LoRAs):

* **weights**: every layer of the output dequantized and compared with the
  reference's (relative RMSE, cosine), one tensor at a time;
* **end to end**: every sample (each prompt with each seed) sampled with the
  reference's weights and with the output's on the same noise, the final
  latents compared (PSNR, SSIM on the unpacked latent channels, cosine,
  relative RMSE; pixels and LPIPS when a VAE decodes them): the mean over the
  samples and a bootstrap 95% interval (``report``, ``stats``).

The samples run as one batch: each block's weights are read (and, for a
quantized output, decoded) once per step for all of them, not once per
sample.  Prompts are embeddings files (``--embeds``, repeatable) and seeded
synthetic embeddings held out from those calibration and the mix measure on
(``--synthetic N``); seeds run from ``--seed`` (``--seeds N``).

``report.json`` (schema ``report.SCHEMA_VERSION``), ``report.md`` and
``index.html`` go into the report folder, written whole or not at all.  With
a baseline report, every figure must be no worse than the baseline's beyond
the tolerance, or the run fails naming the figure and the worst layer; a
baseline made with other settings (prompts and seeds included) is refused,
naming the settings that differ.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import torch

from qconvert.core.errors import CheckpointError, QConvertError, QuantizationError
from qconvert.core.models import qwen_image as qi
from qconvert.core.pipeline import all_finite
from qconvert.formats.opener import open_output
from qconvert.running import inputs, metrics, sampler
from qconvert.running.model import Block, QwenImageTransformer
from qconvert.running.providers import DenseProvider, FiniteOutputs, native_provider
from qconvert.running.report import GateFailure, build_report, gate, read_baseline, write_report
from qconvert.running.sample import placement

__all__ = ["GateFailure", "run_verify", "sample_latents", "measured_steps", "Batch", "load_batch"]
MAX_SAMPLES = 1024  # prompts x seeds in one batch


def provider_for(source, options, **kwargs):
    """The weight provider running ``source``: its own when the format computes differently from dense
    weights (SVDQuant quantizes activations), else dense weights in the compute dtype."""
    device, dtype = placement(options)
    # SVDQuant has no dequantized runtime; ComfyUI's formats do on GPUs without their native matmuls
    native = options.runtime == "native" or getattr(source, "runs_natively_only", False)
    own = native_provider(source, dtype=dtype, device=device, **kwargs) if native else None
    provider = own or DenseProvider(source, dtype=dtype, device=device, **kwargs)
    return FiniteOutputs(provider, str(getattr(source, "path", "the model")))


def model_weights(reference) -> list[str]:
    """The weights verify compares: every model tensor but markers."""
    return [n for n in reference.tensors if qi.is_known(n) and qi.describe(n).role is not qi.Role.MARKER]


@dataclass
class Batch:
    """verify's samples as one batch: every prompt with every seed."""

    prompt: inputs.Prompt  # [B, L, text_dim], padded and masked
    noise: torch.Tensor  # [B, tokens, 64]
    samples: list  # [{"prompt": label, "seed": s}] in batch order
    references: torch.Tensor | None = None  # Edit: each sample's reference image, packed [B, tokens, 64]

    def __len__(self) -> int:
        return len(self.samples)

    def shapes(self, height: int, width: int) -> list:
        return inputs.image_shapes(height, width, self.references is not None)

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The image tokens the model sees: the target's, then the reference's (as the Edit pipelines join them)."""
        if self.references is None:
            return latents
        return torch.cat([latents, self.references.to(latents.device, latents.dtype)], dim=1)


def check_sampling(options) -> None:
    """--synthetic, --seeds and --embeds, before anything is read."""
    if options.seeds < 1:
        raise QConvertError(f"--seeds {options.seeds}: give 1 or more noise seeds per prompt")
    if options.synthetic < 0:
        raise QConvertError(f"--synthetic {options.synthetic}: give 0 or more synthetic prompts")
    prompts = len(options.prompt_files) + options.synthetic
    if prompts == 0:
        raise QConvertError("--synthetic 0 and no --embeds: give at least one prompt")
    if prompts * options.seeds > MAX_SAMPLES:
        raise QConvertError(f"{prompts} prompts x {options.seeds} seeds = {prompts * options.seeds} samples; verify "
                            f"runs at most {MAX_SAMPLES} in one batch")
    if not 0 <= options.seed < (1 << 62) - options.seeds:
        raise QConvertError(f"--seed {options.seed}: give a seed from 0 that fits in 62 bits")
    seen: dict = {}
    for f in options.prompt_files:
        key = os.path.realpath(f)
        if key in seen:
            raise QConvertError(f"--embeds {f}: given twice (also as {seen[key]}); each prompt once")
        seen[key] = f


def _label(path) -> str:
    """A prompt file by name and content: a baseline made with another file of the same name is refused."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"{path.name}#{digest.hexdigest()[:12]}"


def load_batch(options, config, references: bool = False) -> Batch:
    """Every prompt (files, then held-out synthetic ones) with every seed from ``options.seed`` on; with
    ``references`` (an Edit model) each prompt gets its own held-out synthetic reference image."""
    prompts = [(_label(f), inputs.read_prompt(f, config)) for f in options.prompt_files]
    prompts += [(f"synthetic:{k}", inputs.held_out_prompt(config, k)) for k in range(options.synthetic)]
    negatives = {p.neg_embeds is not None for _, p in prompts}
    if options.cfg > 1 and len(negatives) == 2:
        lacking = next(label for label, p in prompts if p.neg_embeds is None)
        raise QConvertError(f"{lacking}: has no negative_prompt_embeds while other prompts do; with --cfg "
                            f"{options.cfg:g} every prompt needs one (or run with --cfg 1)")
    if options.cfg <= 1:  # no CFG: the negatives are not run
        prompts = [(label, inputs.Prompt(p.embeds, p.mask)) for label, p in prompts]
    seeds = [options.seed + i for i in range(options.seeds)]
    order = [(label, prompt, seed) for label, prompt in prompts for seed in seeds]
    batch = inputs.batch_prompts([prompt for _, prompt, _ in order])
    noise = torch.cat([inputs.seeded_noise(seed, options.height, options.width) for _, _, seed in order])
    refs = None
    if references:
        index = {label: k for k, label in enumerate(dict.fromkeys(label for label, _, _ in order))}
        refs = torch.cat([inputs.synthetic_reference(inputs.HELD_OUT_SEEDS + index[label], options.height,
                                                     options.width) for label, _, _ in order])
    return Batch(batch, noise, [{"prompt": label, "seed": seed} for label, _, seed in order], refs)


def settings_json(o, batch: Batch, decode: bool = False) -> dict:
    return {"height": o.height, "width": o.width, "steps": o.steps, "cfg": o.cfg, "schedule": o.schedule,
            "prompts": list(dict.fromkeys(s["prompt"] for s in batch.samples)),
            "seeds": list(dict.fromkeys(s["seed"] for s in batch.samples)),
            "decode": "vae" if decode else "off", "dtype": o.compute_dtype_name, "runtime": o.runtime,
            **({"references": "synthetic, held out, one per prompt"} if batch.references is not None else {})}


class Deadline:
    """``--max-minutes``: phases check it between units of work and stop cleanly when it has passed."""

    def __init__(self, minutes: float | None):
        self.end = None if not minutes else time.monotonic() + 60 * minutes

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


class _Stopped(Exception):
    pass


def plan_line(options, batch: Batch, weights: int, layers: int, at_steps: list, vae_plan, max_minutes) -> str:
    """What verify is about to do, counted."""
    prompts, seeds = len(batch.samples) // options.seeds, options.seeds
    cfg = options.cfg > 1 and batch.prompt.neg_embeds is not None
    calls = options.steps
    edit = "" if batch.references is None else ", each beside a synthetic reference image (an Edit model)"
    return (f"verify: {weights} weights compared one at a time; {len(batch)} samples ({prompts} prompts x {seeds} "
            f"seeds{edit}) in one batch{' (x2 for true CFG)' if cfg else ''}: the reference and the output each "
            f"sampled for {options.steps} steps at {options.height}x{options.width} ({2 * calls} model runs, each "
            f"block read once per run); {layers} blocks measured on the reference's inputs at steps "
            f"{', '.join(str(s + 1) for s in at_steps)} ({2 * len(at_steps)} more block passes)"
            + (f"; every sample decoded by {vae_plan.folder}" if vae_plan.folder else f"; no pixel figures: "
               f"{vae_plan.why_not}") + (f"; stops after {max_minutes:g} min" if max_minutes else ""))


def run_verify(output_path, reference, options, report_dir, *, baseline=None, tolerance: float = 0.05,
               max_minutes: float | None = None, vae=None, decode: bool = True, echo=print) -> dict:
    """Measure, write the report, then gate.  ``options`` is a ``sample.SampleOptions``; ``vae`` a
    diffusers vae/ folder (default: the reference repo's), ``decode=False`` for latent figures only."""
    from qconvert.running.decode import find_vae
    from qconvert.running.sample import check_options

    check_options(options)
    check_sampling(options)
    vae_plan = find_vae(getattr(reference, "path", None), vae, decode)
    batch = load_batch(options, reference.config, inputs.takes_references(reference))  # checked before any work
    settings = settings_json(options, batch, vae_plan.folder is not None)
    base = read_baseline(baseline, settings) if baseline else None
    output, kind = open_output(output_path)
    names = model_weights(reference)
    have = set(output.names())
    missing = next((n for n in names if n not in have), None)
    if missing:
        raise CheckpointError(f"{output_path}: has no tensor {missing}; the output is not of the reference's "
                              "model and config")
    at_steps = measured_steps(options.steps)
    echo(plan_line(options, batch, len(names), reference.config.num_layers, at_steps, vae_plan, max_minutes))
    deadline = Deadline(max_minutes)
    found: dict = {"weights": None, "blocks": None, "latents": None, "pixels": None,
                   "pixels_skipped": vae_plan.why_not}
    stopped, pixel_images = None, None
    try:
        found["weights"] = weight_errors(output, reference, names, deadline)
        along = {}  # the reference's latents entering each measured step

        def estimate(took: float) -> None:
            rest = took * (options.steps - 1) + took * options.steps + took * len(at_steps) * 2
            echo(f"  step 1 of the reference run took {took:.1f} s; about {rest:.0f} s of sampling and block "
                 "measurement left")

        ref_latents = sample_latents(reference, reference, options, batch, deadline, record=(at_steps, along),
                                     first_step=estimate)
        found["blocks"] = block_errors(output, reference, options, batch, along, deadline)
        found["latents"] = (ref_latents, sample_latents(output, reference, options, batch, deadline))
        if vae_plan.folder is not None:
            if deadline.passed():
                raise _Stopped("decoding: not started")
            start = time.monotonic()
            found["pixels"], pixel_images = decode_samples(vae_plan.folder, found["latents"], options, deadline)
            echo(f"  decoding {len(batch)} pairs took {time.monotonic() - start:.1f} s")
    except _Stopped as exc:
        stopped = str(exc)
        echo(f"  --max-minutes reached: {stopped}; the report is partial")
    report = build_report(output_path, kind, reference, settings, found, stopped, batch.samples)
    images = None
    if found["latents"] is not None:
        images = tuple(metrics.unpack(x[:1], options.height, options.width) for x in found["latents"])
    write_report(report, report_dir, images, pixel_images)
    if base is not None:
        if stopped:
            raise GateFailure(f"gate: the report is partial ({stopped}), so it is not gated; raise --max-minutes")
        gate(report, base, tolerance)
    return report


def weight_errors(output, reference, names: list[str], deadline: Deadline | None = None) -> list[dict]:
    rows = []
    for name in names:
        if deadline is not None and deadline.passed():
            raise _Stopped(f"weights: {len(rows)} of {len(names)} compared")
        ref = reference.load(name).to(torch.float32)
        out = output.load(name)
        if tuple(out.shape) != tuple(ref.shape):
            raise CheckpointError(f"tensor {name} is {list(out.shape)} in the output but {list(ref.shape)} in the "
                                  "reference: they are not the same model and config")
        if out.is_floating_point() and out.numel() and not all_finite(out):
            raise QuantizationError(f"{getattr(output, 'path', 'the output')}: tensor {name} holds NaN/Inf as the "
                                    "file's runtime reads it (damaged weights, scales or smoothing factors); the file "
                                    "fails verify")
        rows.append({"name": name, "role": qi.describe(name).role.value, "rel_rmse": metrics.rel_rmse(out, ref),
                     "cosine": metrics.cosine(out, ref)})
    return rows


def measured_steps(steps: int) -> list[int]:
    """The steps whose block errors verify measures: the first, the middle and the last."""
    return sorted({0, steps // 2, steps - 1})


def block_errors(output, reference, options, batch: Batch, along: dict, deadline: Deadline | None = None) -> list[dict]:
    """Each block of the output run on the reference's input to it, at each step in ``along``
    ({step: (latents entering it, t)}), every sample at once: the error a block adds, early and late."""
    config = reference.config
    shapes = batch.shapes(options.height, options.width)
    device, dtype = placement(options)
    ref_provider, out_provider = (provider_for(s, options) for s in (reference, output))
    prompt = batch.prompt.to(device, dtype)
    rows = []
    with torch.no_grad():
        for step, (latents, t) in sorted(along.items()):
            t = t.expand(latents.shape[0])
            state = QwenImageTransformer(config, ref_provider).embed(batch.model_input(latents.to(device, dtype)),
                                                                     prompt.embeds, prompt.mask, t.to(device), shapes)
            for i in range(config.num_layers):
                if deadline is not None and deadline.passed():
                    raise _Stopped(f"blocks: step {step}, {i} of {config.num_layers} measured")
                args = (state.img, state.txt, state.temb, state.mask, state.freqs, state.modulate_index)
                ref_img, ref_txt = Block(ref_provider, i, config)(*args)
                out_img, out_txt = Block(out_provider, i, config)(*args)
                rows.append({"step": step, "block": i, "img_rel_rmse": metrics.rel_rmse(out_img, ref_img),
                             "txt_rel_rmse": _text_rmse(out_txt, ref_txt, state.mask)})
                state.img, state.txt = ref_img, ref_txt
    return rows


def _text_rmse(out: torch.Tensor, ref: torch.Tensor, mask) -> float:
    """The text stream's error over real tokens (padding, masked out of attention, is no one's output)."""
    if mask is None:
        return metrics.rel_rmse(out, ref)
    keep = mask[:, 0, 0, :out.shape[1]]
    return metrics.rel_rmse(out[keep], ref[keep])


def sample_latents(source, reference, options, batch: Batch, deadline: Deadline | None = None, record=None,
                   first_step=None) -> torch.Tensor:
    """The batch's sampling run; ``record`` = (steps, into) keeps {step: (latents entering it, its t)};
    ``first_step(seconds)`` is told how long the first step took."""
    device, dtype = placement(options)
    noise = batch.noise.to(device, dtype)
    model = QwenImageTransformer(reference.config, provider_for(source, options, cache_bytes=options.cache_bytes))
    prompt = batch.prompt.to(device, dtype)
    references = None if batch.references is None else batch.references.to(device, dtype)
    levels = sampler.sigmas(sampler.SCHEDULES[options.schedule], options.steps, noise.shape[1])
    if record is not None and 0 in record[0]:
        record[1][0] = (noise, levels[:1])
    start = time.monotonic()

    def check(i: int, total: int, latents) -> None:
        if i == 0 and first_step is not None:
            first_step(time.monotonic() - start)
        if record is not None and i + 1 in record[0]:
            record[1][i + 1] = (latents, levels[i + 1:i + 2])
        if deadline is not None and deadline.passed() and i + 1 < total:
            raise _Stopped(f"sampling: {i + 1} of {total} steps run")

    with torch.no_grad():
        latents = sampler.sample(model, noise, prompt.embeds, prompt.mask, steps=options.steps,
                                 schedule=options.schedule, cfg=options.cfg, neg_text=prompt.neg_embeds,
                                 neg_mask=prompt.neg_mask, img_shapes=batch.shapes(options.height, options.width),
                                 image_latents=references, on_step=check)
    return latents.float().cpu()


def decode_samples(folder, latents: tuple, options, deadline: Deadline | None = None) -> tuple:
    """(per-sample pixel figures and LPIPS's reason if skipped, the first sample's (reference, output) pixels):
    every sample's final latents decoded by the reference's VAE."""
    from qconvert.running.decode import Decoder, lpips_distance, lpips_model

    decoder = Decoder(folder, device=placement(options)[0])
    model, why_not = lpips_model()
    rows, first = [], None
    for i in range(latents[0].shape[0]):
        if deadline is not None and deadline.passed():
            raise _Stopped(f"decoding: {i} of {latents[0].shape[0]} samples decoded")
        ref_px, out_px = (decoder.pixels(metrics.unpack(x[i:i + 1], options.height, options.width)) for x in latents)
        rows.append({"psnr_db": metrics.psnr(out_px, ref_px, peak=1.0),
                     "ssim": metrics.ssim(out_px, ref_px, data_range=1.0),
                     "lpips": lpips_distance(model, out_px, ref_px) if model is not None else None})
        first = first or (ref_px, out_px)
    del decoder
    return (rows, why_not), first
