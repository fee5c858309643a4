"""``qconvert verify``: how faithful an output is to its source, as a report CI can gate on.

Two measurements, both against the reference (the source through the same LoRAs):

* **weights**: every layer of the output dequantized and compared with the
  reference's (relative RMSE, cosine), one tensor at a time;
* **end to end**: the same sampling run (same embeddings, noise, schedule)
  with the reference's weights and with the output's, the final latents
  compared (PSNR, SSIM on the unpacked latent channels, cosine, relative RMSE).

``report.json`` (schema ``SCHEMA_VERSION``) and ``report.md`` go into the
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

from .. import untrusted
from ..checkpoint import open_checkpoint, read_json_file
from ..errors import CheckpointError, QConvertError
from ..io import atomic_directory
from ..models import qwen_image as qi
from . import inputs, metrics, sampler
from .model import QwenImageTransformer
from .providers import DenseProvider, FP8Weights, GGUFWeights

SCHEMA_VERSION = 1
REPORT_LIMITS = untrusted.Limits(objects=20_000, items=200_000)
# (figure, better): the gate compares these with the baseline
FIGURES = (("weights.worst_rel_rmse", "lower"), ("weights.mean_rel_rmse", "lower"),
           ("latents.psnr_db", "higher"), ("latents.ssim", "higher"), ("latents.rel_rmse", "lower"))


class GateFailure(QConvertError):
    """A figure is worse than the baseline's beyond the tolerance."""


def open_output(path) -> tuple[object, str]:
    """A weight source for any file qconvert writes, and what it is."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return GGUFWeights(p), "gguf"
    if p.is_file() and p.suffix.lower() == ".safetensors":
        from ..formats.fp8_loader import fp8_layout

        layout = fp8_layout(p)
        if layout != "none":
            return FP8Weights(p), f"fp8-{layout}"
    return open_checkpoint(p), "checkpoint"


def model_weights(reference) -> list[str]:
    """The weights verify compares: every model tensor but markers."""
    return [n for n in reference.tensors if qi.is_known(n) and qi.describe(n).role is not qi.Role.MARKER]


def weight_errors(output, reference, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        ref = reference.load(name).to(torch.float32)
        out = output.load(name)
        if tuple(out.shape) != tuple(ref.shape):
            raise CheckpointError(f"tensor {name} is {list(out.shape)} in the output but {list(ref.shape)} in the "
                                  "reference: they are not the same model and config")
        rows.append({"name": name, "role": qi.describe(name).role.value, "rel_rmse": metrics.rel_rmse(out, ref),
                     "cosine": metrics.cosine(out, ref)})
    return rows


def settings_json(o) -> dict:
    return {"height": o.height, "width": o.width, "steps": o.steps, "cfg": o.cfg, "schedule": o.schedule,
            "seed": o.seed, "embeds": str(o.embeds) if o.embeds else "synthetic"}


def run_verify(output_path, reference, options, report_dir, *, baseline=None, tolerance: float = 0.05,
               echo=print) -> dict:
    """Measure, write the report, then gate.  ``options`` is a ``commands.SampleOptions``."""
    from .commands import check_options

    check_options(options)
    base = read_baseline(baseline, settings_json(options)) if baseline else None
    output, kind = open_output(output_path)
    names = model_weights(reference)
    have = set(output.names())
    missing = next((n for n in names if n not in have), None)
    if missing:
        raise CheckpointError(f"{output_path}: has no tensor {missing}; the output is not of the reference's "
                              "model and config")
    echo(f"verify: {len(names)} weights compared one at a time, then 2 sampling runs of {options.steps} steps "
         f"at {options.height}x{options.width} ({reference.config.num_layers} blocks each)")
    start = time.monotonic()
    layers = weight_errors(output, reference, names)
    ref_latents = _sample(reference, reference, options)
    echo(f"  reference run done in {time.monotonic() - start:.1f} s; the output's run takes about as long")
    out_latents = _sample(output, reference, options)
    report = build_report(output_path, kind, reference, options, layers, ref_latents, out_latents)
    write_report(report, report_dir)
    if base is not None:
        gate(report, base, tolerance)
    return report


def _sample(source, reference, options) -> torch.Tensor:
    config = reference.config
    prompt = (inputs.read_prompt(options.embeds, config) if options.embeds
              else inputs.synthetic_prompt(config, options.seed))
    noise = inputs.seeded_noise(options.seed, options.height, options.width)
    model = QwenImageTransformer(config, DenseProvider(source))
    with torch.no_grad():
        return sampler.sample(model, noise, prompt.embeds, prompt.mask, steps=options.steps,
                              schedule=options.schedule, cfg=options.cfg, neg_text=prompt.neg_embeds,
                              neg_mask=prompt.neg_mask, img_shapes=[(1, options.height // 16, options.width // 16)])


def build_report(output_path, kind, reference, options, layers, ref_latents, out_latents) -> dict:
    h, w = options.height, options.width
    ref_img, out_img = metrics.unpack(ref_latents, h, w), metrics.unpack(out_latents, h, w)
    worst = max(layers, key=lambda r: _badness(r["rel_rmse"]))  # a NaN error (NaN weights) is the worst
    return {
        "schema_version": SCHEMA_VERSION,
        "output": str(output_path), "format": kind,
        "reference": reference.provenance(),
        "settings": settings_json(options),
        "weights": {"layers": len(layers), "worst_rel_rmse": worst["rel_rmse"], "worst_layer": worst["name"],
                    "mean_rel_rmse": sum(r["rel_rmse"] for r in layers) / len(layers),
                    "min_cosine": min(r["cosine"] for r in layers)},
        "latents": {"psnr_db": metrics.psnr(out_img, ref_img), "ssim": metrics.ssim(out_img, ref_img),
                    "cosine": metrics.cosine(out_latents, ref_latents),
                    "rel_rmse": metrics.rel_rmse(out_latents, ref_latents)},
        "per_layer": layers,
    }


def write_report(report: dict, folder) -> None:
    with atomic_directory(Path(folder)) as tmp:
        # JSON has no infinity: an identical run's PSNR is written as null
        (tmp / "report.json").write_text(json.dumps(_finite(report), indent=2, sort_keys=True) + "\n")
        (tmp / "report.md").write_text(markdown(report))


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def markdown(r: dict) -> str:
    w, lat = r["weights"], r["latents"]
    psnr = "identical" if lat["psnr_db"] is None or lat["psnr_db"] == math.inf else f"{lat['psnr_db']:.2f} dB"
    lines = [f"# qconvert verify: {Path(r['output']).name}", "",
             f"Format {r['format']}, against {r['reference']['source']} ({r['reference']['variant']}).", "",
             "| figure | value |", "|---|---|",
             f"| latent PSNR | {psnr} |", f"| latent SSIM | {lat['ssim']:.5f} |",
             f"| latent cosine | {lat['cosine']:.6f} |", f"| latent relative RMSE | {lat['rel_rmse']:.5f} |",
             f"| weights: worst relative RMSE | {w['worst_rel_rmse']:.5f} ({w['worst_layer']}) |",
             f"| weights: mean relative RMSE | {w['mean_rel_rmse']:.5f} over {w['layers']} tensors |",
             f"| weights: lowest cosine | {w['min_cosine']:.6f} |", "",
             "Settings: " + ", ".join(f"{k} {v}" for k, v in r["settings"].items()), "",
             "## Worst layers", "", "| layer | role | relative RMSE | cosine |", "|---|---|---|---|"]
    for row in sorted(r["per_layer"], key=lambda x: -_badness(x["rel_rmse"]))[:20]:
        lines.append(f"| {row['name']} | {row['role']} | {row['rel_rmse']:.5f} | {row['cosine']:.6f} |")
    return "\n".join(lines) + "\n"


def read_baseline(path, settings: dict) -> dict:
    """A baseline report.json, checked as a hostile file, made with the same settings."""
    path = Path(path)
    data = read_json_file(path, REPORT_LIMITS)
    where = str(path)
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"{where}: not a qconvert verify report of schema {SCHEMA_VERSION}")
    theirs = data.get("settings")
    if not isinstance(theirs, dict):
        raise CheckpointError(f"{where}: has no settings object")
    differ = [k for k in settings if theirs.get(k) != settings[k]]
    if differ:
        detail = ", ".join(f"{k} {untrusted.shown(theirs.get(k), 40)} there, {settings[k]} here" for k in differ)
        raise QConvertError(f"{where}: made with other settings ({detail}); rerun the baseline with these")
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


def gate(report: dict, base: dict, tolerance: float) -> None:
    """Fail on the first figure worse than the baseline's beyond ``tolerance`` (a fraction)."""
    for figure, better in FIGURES:
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
