"""``qconvert verify``: how faithful an output is to its source, as a report CI can gate on.

Two measurements, both against the reference (the source through the same LoRAs):

* **weights**: every layer of the output dequantized and compared with the
  reference's (relative RMSE, cosine), one tensor at a time;
* **end to end**: the same sampling run (same embeddings, noise, schedule)
  with the reference's weights and with the output's, the final latents
  compared (PSNR, SSIM on the unpacked latent channels, cosine, relative RMSE).

``report.json`` (schema ``SCHEMA_VERSION``), ``report.md`` and ``index.html``
(latent previews, a difference map, the per-layer error chart) go into the
report folder, written whole or not at all.  With a baseline report, every
figure must be no worse than the baseline's beyond the tolerance, or the run
fails naming the figure and the worst layer; a baseline made with other
settings is refused, naming the settings that differ.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from qconvert.core import untrusted
from qconvert.core.checkpoint import read_json_file
from qconvert.core.errors import CheckpointError, QConvertError, QuantizationError
from qconvert.core.io import atomic_directory
from qconvert.core.models import qwen_image as qi
from qconvert.core.pipeline import all_finite
from qconvert.formats.opener import open_output
from qconvert.running import inputs, metrics, sampler
from qconvert.running.model import Block, QwenImageTransformer
from qconvert.running.providers import DenseProvider, FiniteOutputs, native_provider
from qconvert.running.sample import placement

SCHEMA_VERSION = 2  # 2: per_block rows carry their step; pixels; settings.decode
REPORT_LIMITS = untrusted.Limits(objects=20_000, items=200_000)
# (figure, better): the gate compares these with the baseline
FIGURES = (("weights.worst_rel_rmse", "lower"), ("weights.mean_rel_rmse", "lower"),
           ("blocks.worst_rel_rmse", "lower"),
           ("latents.psnr_db", "higher"), ("latents.ssim", "higher"), ("latents.rel_rmse", "lower"),
           ("pixels.psnr_db", "higher"), ("pixels.ssim", "higher"), ("pixels.lpips", "lower"))


class GateFailure(QConvertError):
    """A figure is worse than the baseline's beyond the tolerance."""


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


def settings_json(o, decode: bool = False) -> dict:
    return {"height": o.height, "width": o.width, "steps": o.steps, "cfg": o.cfg, "schedule": o.schedule,
            "seed": o.seed, "embeds": str(o.embeds) if o.embeds else "synthetic",
            "decode": "vae" if decode else "off", "dtype": o.compute_dtype_name, "runtime": o.runtime}


class Deadline:
    """``--max-minutes``: phases check it between units of work and stop cleanly when it has passed."""

    def __init__(self, minutes: float | None):
        self.end = None if not minutes else time.monotonic() + 60 * minutes

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


class _Stopped(Exception):
    pass


def run_verify(output_path, reference, options, report_dir, *, baseline=None, tolerance: float = 0.05,
               max_minutes: float | None = None, vae=None, decode: bool = True, echo=print) -> dict:
    """Measure, write the report, then gate.  ``options`` is a ``commands.SampleOptions``; ``vae`` a
    diffusers vae/ folder (default: the reference repo's), ``decode=False`` for latent figures only."""
    from qconvert.running.decode import find_vae
    from qconvert.running.sample import check_options, load_prompt

    check_options(options)
    vae_plan = find_vae(getattr(reference, "path", None), vae, decode)
    base = read_baseline(baseline, settings_json(options, vae_plan.folder is not None)) if baseline else None
    prompt = load_prompt(options, reference.config)  # read once, and checked before any work
    output, kind = open_output(output_path)
    names = model_weights(reference)
    have = set(output.names())
    missing = next((n for n in names if n not in have), None)
    if missing:
        raise CheckpointError(f"{output_path}: has no tensor {missing}; the output is not of the reference's "
                              "model and config")
    layers_n = reference.config.num_layers
    at_steps = measured_steps(options.steps)
    echo(f"verify: {len(names)} weights compared one at a time; 2 sampling runs of {options.steps} steps at "
         f"{options.height}x{options.width}; {layers_n} blocks run on the reference's inputs at steps "
         f"{', '.join(str(s + 1) for s in at_steps)}"
         + (f"; both runs decoded by {vae_plan.folder}" if vae_plan.folder else f"; no pixel figures: {vae_plan.why_not}")
         + (f"; stops after {max_minutes:g} min" if max_minutes else ""))
    deadline = Deadline(max_minutes)
    found: dict = {"weights": None, "blocks": None, "latents": None, "pixels": None,
                   "pixels_skipped": vae_plan.why_not}
    stopped = None
    try:
        found["weights"] = weight_errors(output, reference, names, deadline)
        start = time.monotonic()
        along = {}  # the reference's latents entering each measured step
        ref_latents = sample_latents(reference, reference, options, prompt, deadline, record=(at_steps, along))
        echo(f"  reference run took {time.monotonic() - start:.1f} s; the output's takes about as long")
        found["blocks"] = block_errors(output, reference, options, prompt, along, deadline)
        found["latents"] = (ref_latents, sample_latents(output, reference, options, prompt, deadline))
        if vae_plan.folder is not None:
            if deadline.passed():
                raise _Stopped("decoding: not started")
            start = time.monotonic()
            found["pixels"] = decode_pair(vae_plan.folder, found["latents"], options)
            echo(f"  decoding took {time.monotonic() - start:.1f} s")
    except _Stopped as exc:
        stopped = str(exc)
        echo(f"  --max-minutes reached: {stopped}; the report is partial")
    report = build_report(output_path, kind, reference, options, found, stopped, vae_plan.folder is not None)
    images = None
    if found["latents"] is not None:
        images = tuple(metrics.unpack(x, options.height, options.width) for x in found["latents"])
    write_report(report, report_dir, images, found["pixels"][:2] if found["pixels"] else None)
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


def block_errors(output, reference, options, prompt, along: dict, deadline: Deadline | None = None) -> list[dict]:
    """Each block of the output run on the reference's input to it, at each step in ``along``
    ({step: (latents entering it, t)}): the error a block adds, early and late in sampling."""
    config = reference.config
    shapes = [(1, options.height // 16, options.width // 16)]
    device, dtype = placement(options)
    ref_provider, out_provider = (provider_for(s, options) for s in (reference, output))
    prompt = prompt.to(device, dtype)
    rows = []
    with torch.no_grad():
        for step, (latents, t) in sorted(along.items()):
            state = QwenImageTransformer(config, ref_provider).embed(latents.to(device, dtype), prompt.embeds,
                                                                     prompt.mask, t.to(device), shapes)
            for i in range(config.num_layers):
                if deadline is not None and deadline.passed():
                    raise _Stopped(f"blocks: step {step}, {i} of {config.num_layers} measured")
                args = (state.img, state.txt, state.temb, state.mask, state.freqs, state.modulate_index)
                ref_img, ref_txt = Block(ref_provider, i, config)(*args)
                out_img, out_txt = Block(out_provider, i, config)(*args)
                rows.append({"step": step, "block": i, "img_rel_rmse": metrics.rel_rmse(out_img, ref_img),
                             "txt_rel_rmse": metrics.rel_rmse(out_txt, ref_txt)})
                state.img, state.txt = ref_img, ref_txt
    return rows


def sample_latents(source, reference, options, prompt, deadline: Deadline | None = None, record=None) -> torch.Tensor:
    """One sampling run; ``record`` = (steps, into) keeps {step: (latents entering it, its t)}."""
    device, dtype = placement(options)
    noise = inputs.seeded_noise(options.seed, options.height, options.width).to(device, dtype)
    model = QwenImageTransformer(reference.config, provider_for(source, options, cache_bytes=options.cache_bytes))
    prompt = prompt.to(device, dtype)
    levels = sampler.sigmas(sampler.SCHEDULES[options.schedule], options.steps, noise.shape[1])
    if record is not None and 0 in record[0]:
        record[1][0] = (noise, levels[:1])

    def check(i: int, total: int, latents) -> None:
        if record is not None and i + 1 in record[0]:
            record[1][i + 1] = (latents, levels[i + 1:i + 2])
        if deadline is not None and deadline.passed() and i + 1 < total:
            raise _Stopped(f"sampling: {i + 1} of {total} steps run")

    with torch.no_grad():
        latents = sampler.sample(model, noise, prompt.embeds, prompt.mask, steps=options.steps,
                                 schedule=options.schedule, cfg=options.cfg, neg_text=prompt.neg_embeds,
                                 neg_mask=prompt.neg_mask, img_shapes=[(1, options.height // 16, options.width // 16)],
                                 on_step=check)
    return latents.float().cpu()


def decode_pair(folder, latents: tuple, options) -> tuple:
    """(reference pixels, output pixels, figures): both final latents decoded by the reference's VAE."""
    from qconvert.running.decode import Decoder, lpips_distance, lpips_model

    decoder = Decoder(folder, device=placement(options)[0])
    ref_px, out_px = (decoder.pixels(metrics.unpack(x, options.height, options.width)) for x in latents)
    del decoder
    figures = {"psnr_db": metrics.psnr(out_px, ref_px, peak=1.0), "ssim": metrics.ssim(out_px, ref_px, data_range=1.0),
               "lpips": None, "lpips_skipped": None}
    model, why_not = lpips_model()
    if model is None:
        figures["lpips_skipped"] = why_not
    else:
        figures["lpips"] = lpips_distance(model, out_px, ref_px)
    return ref_px, out_px, figures


def build_report(output_path, kind, reference, options, found: dict, stopped: str | None,
                 decode: bool = False) -> dict:
    report = {"schema_version": SCHEMA_VERSION, "output": str(output_path), "format": kind,
              "reference": reference.provenance(), "settings": settings_json(options, decode),
              "complete": stopped is None, "stopped": stopped,
              "weights": None, "blocks": None, "latents": None, "per_layer": found["weights"] or [],
              "per_block": found["blocks"] or [], "pixels": found["pixels"][2] if found["pixels"] else None,
              "pixels_skipped": found["pixels_skipped"]}
    layers = found["weights"]
    if layers:
        worst = max(layers, key=lambda r: _badness(r["rel_rmse"]))  # a NaN error (NaN weights) is the worst
        # the mean over every tensor counts the ones stored as they were (BF16 of a BF16 source, error 0), so it
        # shrinks as more of them stay; the mean over the tensors the output changes is the quantizer's
        changed = [r["rel_rmse"] for r in layers if r["rel_rmse"] != 0]
        report["weights"] = {"layers": len(layers), "worst_rel_rmse": worst["rel_rmse"], "worst_layer": worst["name"],
                             "mean_rel_rmse": sum(r["rel_rmse"] for r in layers) / len(layers),
                             "changed_tensors": len(changed),
                             "changed_mean_rel_rmse": sum(changed) / len(changed) if changed else 0.0,
                             "min_cosine": min(r["cosine"] for r in layers)}
    blocks = found["blocks"]
    if blocks:
        worst = max(blocks, key=lambda r: _badness(r["img_rel_rmse"]))
        report["blocks"] = {"worst_rel_rmse": worst["img_rel_rmse"], "worst_block": worst["block"],
                            "worst_step": worst["step"], "steps": sorted({r["step"] for r in blocks})}
    if found["latents"] is not None:
        ref_latents, out_latents = found["latents"]
        h, w = options.height, options.width
        ref_img, out_img = metrics.unpack(ref_latents, h, w), metrics.unpack(out_latents, h, w)
        report["latents"] = {"psnr_db": metrics.psnr(out_img, ref_img), "ssim": metrics.ssim(out_img, ref_img),
                             "cosine": metrics.cosine(out_latents, ref_latents),
                             "rel_rmse": metrics.rel_rmse(out_latents, ref_latents)}
    return report


def write_report(report: dict, folder, images: tuple | None = None, pixels: tuple | None = None) -> None:
    """report.json, report.md, and index.html with pictures of the (reference, output) latents and,
    when decoded, pixels."""
    from qconvert.running.pictures import page, write_pictures, write_pixel_pictures

    with atomic_directory(Path(folder)) as tmp:
        # JSON has no infinity: an identical run's PSNR is written as null
        (tmp / "report.json").write_text(json.dumps(_finite(report), indent=2, sort_keys=True) + "\n")
        text = markdown(report)
        (tmp / "report.md").write_text(text)
        pictures = write_pictures(tmp, *images) if images is not None else []
        pixel_pictures = write_pixel_pictures(tmp, *pixels) if pixels is not None else []
        (tmp / "index.html").write_text(page(report, text, pictures, pixel_pictures))


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def markdown(r: dict) -> str:
    lines = [f"# qconvert verify: {Path(r['output']).name}", ""]
    if not r["complete"]:
        lines += [f"**Partial report**: stopped by --max-minutes ({r['stopped']}).", ""]
    lines += [f"Format {r['format']}, against {r['reference']['source']} ({r['reference']['variant']}).", "",
              "| figure | value |", "|---|---|"]
    lat, w, b, px = r["latents"], r["weights"], r["blocks"], r.get("pixels")
    if px:
        psnr = "identical" if px["psnr_db"] is None or px["psnr_db"] == math.inf else f"{px['psnr_db']:.2f} dB"
        lpips = f"{px['lpips']:.4f}" if px["lpips"] is not None else f"skipped: {px['lpips_skipped']}"
        lines += [f"| pixel PSNR (VAE-decoded) | {psnr} |", f"| pixel SSIM | {px['ssim']:.5f} |",
                  f"| LPIPS | {lpips} |"]
    elif r.get("pixels_skipped"):
        lines.append(f"| pixels | not decoded: {r['pixels_skipped']} |")
    if lat:
        psnr = "identical" if lat["psnr_db"] is None or lat["psnr_db"] == math.inf else f"{lat['psnr_db']:.2f} dB"
        lines += [f"| latent PSNR | {psnr} |", f"| latent SSIM | {lat['ssim']:.5f} |",
                  f"| latent cosine | {lat['cosine']:.6f} |", f"| latent relative RMSE | {lat['rel_rmse']:.5f} |"]
    if b:
        lines.append(f"| block output: worst relative RMSE | {b['worst_rel_rmse']:.5f} (block {b['worst_block']}, "
                     f"step {b['worst_step'] + 1}) |")
    if w:
        lines += [f"| weights: worst relative RMSE | {w['worst_rel_rmse']:.5f} ({w['worst_layer']}) |",
                  f"| weights: mean relative RMSE | {w['mean_rel_rmse']:.5f} over all {w['layers']} tensors |",
                  *([f"| weights: mean relative RMSE of the changed | {w['changed_mean_rel_rmse']:.5f} over the "
                     f"{w['changed_tensors']} tensors the output changes |"] if "changed_tensors" in w else []),
                  f"| weights: lowest cosine | {w['min_cosine']:.6f} |"]
    lines += ["", "Settings: " + ", ".join(f"{k} {v}" for k, v in r["settings"].items()), ""]
    if r["per_block"]:
        lines += ["## Blocks (each on the reference's input to it, at the first, middle and last step)", "",
                  "| step | block | image stream | text stream |", "|---|---|---|---|"]
        lines += [f"| {row['step'] + 1} | {row['block']} | {row['img_rel_rmse']:.5f} | {row['txt_rel_rmse']:.5f} |"
                  for row in r["per_block"]]
        lines.append("")
    if r["per_layer"]:
        lines += ["## Worst layers", "", "| layer | role | relative RMSE | cosine |", "|---|---|---|---|"]
        for row in sorted(r["per_layer"], key=lambda x: -_badness(x["rel_rmse"]))[:20]:
            lines.append(f"| {row['name']} | {row['role']} | {row['rel_rmse']:.5f} | {row['cosine']:.6f} |")
    return "\n".join(lines) + "\n"


def read_baseline(path, settings: dict) -> dict:
    """A baseline report.json, checked as a hostile file, made with the same settings."""
    path = Path(path)
    data = read_json_file(path, REPORT_LIMITS)
    where = str(path)
    if not isinstance(data, dict) or "schema_version" not in data:
        raise CheckpointError(f"{where}: not a qconvert verify report")
    if data["schema_version"] != SCHEMA_VERSION:
        raise CheckpointError(f"{where}: a verify report of schema {untrusted.shown(data['schema_version'], 20)}; "
                              f"this qconvert writes and gates on schema {SCHEMA_VERSION}: rerun the baseline")
    theirs = data.get("settings")
    if not isinstance(theirs, dict):
        raise CheckpointError(f"{where}: has no settings object")
    differ = [k for k in settings if theirs.get(k) != settings[k]]
    if differ:
        detail = ", ".join(f"{k} {untrusted.shown(theirs.get(k), 40)} there, {settings[k]} here" for k in differ)
        raise QConvertError(f"{where}: made with other settings ({detail}); rerun the baseline with these")
    if data.get("complete") is not True or not all(isinstance(data.get(k), dict) for k in ("weights", "blocks", "latents")):
        raise CheckpointError(f"{where}: a partial report (or one missing its weights, blocks or latents figures) "
                              "cannot be a baseline")
    for figure, _ in FIGURES:
        value = _figure(data, figure)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise CheckpointError(f"{where}: {figure} must be a number, not {untrusted.type_name(value)}")
    return data


def _badness(error: float) -> float:
    return math.inf if math.isnan(error) else error


def _figure(report: dict, figure: str):
    section, key = figure.split(".")
    part = report.get(section)
    return part.get(key) if isinstance(part, dict) else None


def _measured(report: dict, figure: str) -> bool:
    """Whether the report has the figure's section (LPIPS and pixels are optional)."""
    section, key = figure.split(".")
    part = report.get(section)
    return isinstance(part, dict) and not (key == "lpips" and part.get("lpips") is None)


def gate(report: dict, base: dict, tolerance: float) -> None:
    """Fail on the first figure worse than the baseline's beyond ``tolerance`` (a fraction)."""
    for figure, better in FIGURES:
        if not (_measured(report, figure) and _measured(base, figure)):
            continue
        now, then = _figure(report, figure), _figure(base, figure)
        if then is None:  # an identical baseline run: PSNR infinite
            then = math.inf if better == "higher" else 0.0
        if now is None or now == math.inf:  # None: an infinite PSNR written as null
            now = math.inf if better == "higher" else 0.0
        worse = now < then - abs(then) * tolerance if better == "higher" else now > then + abs(then) * tolerance
        if then == math.inf and better == "higher":
            worse = now != math.inf
        if math.isnan(now):  # NaN weights or latents: nothing is worse
            worse = True
        if worse:
            raise GateFailure(f"gate: {figure} is {now:.6g}, baseline {then:.6g} ({better} is better, tolerance "
                              f"{tolerance:g}); worst layer {report['weights']['worst_layer']} at relative RMSE "
                              f"{report['weights']['worst_rel_rmse']:.4g}")
