"""verify's report: its figures from the measurements, report.json / report.md / index.html, and the baseline gate.

Every end-to-end figure is measured per sample (one prompt, one seed: the
reference and the output on the same noise) and reported as the mean over
the samples with a bootstrap 95% interval (``stats``); the per-sample values
are in ``samples``.  Weight figures are over every tensor and, named as such,
over the tensors the output changes (a BF16 tensor of a BF16 source is
stored as it was, error 0, and would dilute the mean).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from qconvert.core import untrusted
from qconvert.core.checkpoint import read_json_file
from qconvert.core.errors import CheckpointError, QConvertError
from qconvert.core.io import atomic_directory
from qconvert.running import metrics, stats

SCHEMA_VERSION = 3  # 3: samples (prompts x seeds), means with intervals; settings.prompts, settings.seeds
REPORT_LIMITS = untrusted.Limits(objects=50_000, items=400_000)
# (figure, better): the gate compares these with the baseline
FIGURES = (("weights.worst_rel_rmse", "lower"), ("weights.mean_rel_rmse", "lower"),
           ("weights.changed_mean_rel_rmse", "lower"), ("blocks.worst_rel_rmse", "lower"),
           ("latents.psnr_db", "higher"), ("latents.ssim", "higher"), ("latents.rel_rmse", "lower"),
           ("pixels.psnr_db", "higher"), ("pixels.ssim", "higher"), ("pixels.lpips", "lower"))
# the figures measured per sample, which carry intervals
SAMPLED = {"latents": ("psnr_db", "ssim", "cosine", "rel_rmse"), "pixels": ("psnr_db", "ssim", "lpips")}


class GateFailure(QConvertError):
    """A figure is worse than the baseline's beyond the tolerance."""


def latent_figures(ref, out, height: int, width: int) -> list[dict]:
    """Per sample of packed [B, tokens, 64] latents: PSNR and SSIM on the unpacked channels, cosine, RMSE."""
    rows = []
    for i in range(ref.shape[0]):
        r, o = ref[i:i + 1], out[i:i + 1]
        ri, oi = metrics.unpack(r, height, width), metrics.unpack(o, height, width)
        rows.append({"psnr_db": metrics.psnr(oi, ri), "ssim": metrics.ssim(oi, ri), "cosine": metrics.cosine(o, r),
                     "rel_rmse": metrics.rel_rmse(o, r)})
    return rows


def summarize(rows: list[dict], keys) -> dict:
    """Means over the samples, with {"interval": {figure: [low, high]}, "samples": n}."""
    out: dict = {"samples": len(rows), "interval": {}}
    for key in keys:
        values = [row[key] for row in rows if row.get(key) is not None]
        if not values:
            out[key] = None
            continue
        s = stats.summary(values)
        out[key] = s["mean"]
        out["interval"][key] = [s["low"], s["high"]]
    return out


def build_report(output_path, kind: str, reference, settings: dict, found: dict, stopped: str | None,
                 samples: list[dict]) -> dict:
    report = {"schema_version": SCHEMA_VERSION, "output": str(output_path), "format": kind,
              "reference": reference.provenance(), "settings": settings, "statistics": stats.settings(),
              "complete": stopped is None, "stopped": stopped,
              "weights": None, "blocks": None, "latents": None, "pixels": None, "samples": [],
              "per_layer": found["weights"] or [], "per_block": found["blocks"] or [],
              "pixels_skipped": found["pixels_skipped"]}
    layers = found["weights"]
    if layers:
        worst = max(layers, key=lambda r: _badness(r["rel_rmse"]))  # a NaN error (NaN weights) is the worst
        # the mean over every tensor counts the ones stored as they were (BF16 of a BF16 source, error 0), so it
        # shrinks as more of them stay; the mean over the tensors the output changes is the quantizer's
        changed = [r for r in layers if r["rel_rmse"] != 0]
        report["weights"] = {
            "layers": len(layers), "worst_rel_rmse": worst["rel_rmse"], "worst_layer": worst["name"],
            "mean_rel_rmse": sum(r["rel_rmse"] for r in layers) / len(layers),
            "changed_tensors": len(changed),
            "changed_mean_rel_rmse": sum(r["rel_rmse"] for r in changed) / len(changed) if changed else 0.0,
            "changed_min_cosine": min((r["cosine"] for r in changed), default=1.0),
            "min_cosine": min(r["cosine"] for r in layers)}
    blocks = found["blocks"]
    if blocks:
        worst = max(blocks, key=lambda r: _badness(r["img_rel_rmse"]))
        report["blocks"] = {"worst_rel_rmse": worst["img_rel_rmse"], "worst_block": worst["block"],
                            "worst_step": worst["step"], "steps": sorted({r["step"] for r in blocks})}
    per_sample = [dict(s) for s in samples]
    if found["latents"] is not None:
        rows = latent_figures(*found["latents"], settings["height"], settings["width"])
        report["latents"] = summarize(rows, SAMPLED["latents"])
        for s, row in zip(per_sample, rows):
            s["latents"] = row
    if found["pixels"] is not None:
        rows, lpips_skipped = found["pixels"]
        report["pixels"] = {**summarize(rows, SAMPLED["pixels"]), "lpips_skipped": lpips_skipped}
        for s, row in zip(per_sample, rows):
            s["pixels"] = row
    report["samples"] = per_sample if (found["latents"] is not None) else []
    return report


def write_report(report: dict, folder, images: tuple | None = None, pixels: tuple | None = None) -> None:
    """report.json, report.md, and index.html with pictures of the first sample's (reference, output) latents
    and, when decoded, pixels."""
    from qconvert.running.pictures import page, write_pictures, write_pixel_pictures

    with atomic_directory(Path(folder)) as tmp:
        # JSON has no infinity: an identical run's PSNR is written as null
        (tmp / "report.json").write_text(json.dumps(finite(report), indent=2, sort_keys=True) + "\n")
        text = markdown(report)
        (tmp / "report.md").write_text(text)
        pictures = write_pictures(tmp, *images) if images is not None else []
        pixel_pictures = write_pixel_pictures(tmp, *pixels) if pixels is not None else []
        (tmp / "index.html").write_text(page(report, text, pictures, pixel_pictures))


def finite(value):
    """JSON's view: infinities (a PSNR of an exact copy) as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def shown(section: dict, key: str, digits: int, unit: str = "") -> str:
    """A mean and its interval: ``30.12 dB (95%: 29.80 to 30.45)``; "identical" for an infinite PSNR."""
    value = section.get(key)
    if value is None or value == math.inf:
        return "identical"
    text = f"{value:.{digits}f}{unit}"
    low, high = (section.get("interval") or {}).get(key, (None, None))
    if section.get("samples", 1) > 1 and low is not None:
        hi = "inf" if high is None or high == math.inf else f"{high:.{digits}f}"
        text += f" (95%: {low:.{digits}f} to {hi})"
    return text


def markdown(r: dict) -> str:
    lines = [f"# qconvert verify: {Path(r['output']).name}", ""]
    if not r["complete"]:
        lines += [f"**Partial report**: stopped by --max-minutes ({r['stopped']}).", ""]
    lat, w, b, px = r["latents"], r["weights"], r["blocks"], r.get("pixels")
    n = (lat or {}).get("samples", 0)
    lines += [f"Format {r['format']}, against {r['reference']['source']} ({r['reference']['variant']})."
              + (f" End-to-end figures: the mean over {n} samples (prompt x seed, each the reference and the "
                 "output on the same noise) and its bootstrap 95% interval." if n > 1 else ""), "",
              "| figure | value |", "|---|---|"]
    if px:
        lpips = shown(px, "lpips", 4) if px.get("lpips") is not None else f"skipped: {px['lpips_skipped']}"
        lines += [f"| pixel PSNR (VAE-decoded) | {shown(px, 'psnr_db', 2, ' dB')} |",
                  f"| pixel SSIM | {shown(px, 'ssim', 5)} |", f"| LPIPS | {lpips} |"]
    elif r.get("pixels_skipped"):
        lines.append(f"| pixels | not decoded: {r['pixels_skipped']} |")
    if lat:
        lines += [f"| latent PSNR | {shown(lat, 'psnr_db', 2, ' dB')} |", f"| latent SSIM | {shown(lat, 'ssim', 5)} |",
                  f"| latent cosine | {shown(lat, 'cosine', 6)} |",
                  f"| latent relative RMSE | {shown(lat, 'rel_rmse', 5)} |"]
    if b:
        lines.append(f"| block output: worst relative RMSE | {b['worst_rel_rmse']:.5f} (block {b['worst_block']}, "
                     f"step {b['worst_step'] + 1}) |")
    if w:
        lines += [f"| weights: worst relative RMSE | {w['worst_rel_rmse']:.5f} ({w['worst_layer']}) |",
                  f"| weights: mean relative RMSE of the changed tensors | {w['changed_mean_rel_rmse']:.5f} over the "
                  f"{w['changed_tensors']} tensors the output changes |",
                  f"| weights: mean relative RMSE of all tensors | {w['mean_rel_rmse']:.5f} over all {w['layers']} "
                  "(unchanged ones count 0) |",
                  f"| weights: lowest cosine | {w['min_cosine']:.6f} |"]
    lines += ["", "Settings: " + ", ".join(f"{k} {_setting(v)}" for k, v in r["settings"].items()), ""]
    if len(r.get("samples") or []) > 1:
        lines += _sample_table(r["samples"])
    if r["per_block"]:
        lines += ["## Blocks (each on the reference's input to it, at the first, middle and last step; every "
                  "sample)", "", "| step | block | image stream | text stream |", "|---|---|---|---|"]
        lines += [f"| {row['step'] + 1} | {row['block']} | {row['img_rel_rmse']:.5f} | {row['txt_rel_rmse']:.5f} |"
                  for row in r["per_block"]]
        lines.append("")
    if r["per_layer"]:
        lines += ["## Worst layers", "", "| layer | role | relative RMSE | cosine |", "|---|---|---|---|"]
        for row in sorted(r["per_layer"], key=lambda x: -_badness(x["rel_rmse"]))[:20]:
            lines.append(f"| {row['name']} | {row['role']} | {row['rel_rmse']:.5f} | {row['cosine']:.6f} |")
    return "\n".join(lines) + "\n"


def _setting(value) -> str:
    return ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)


def _db(value) -> str:
    return "identical" if value is None or value == math.inf else f"{value:.2f}"


def _sample_table(samples: list[dict]) -> list[str]:
    pixels = any(s.get("pixels") for s in samples)
    head = "| prompt | seed | latent PSNR (dB) | latent SSIM |" + (" pixel PSNR (dB) | LPIPS |" if pixels else "")
    lines = ["## Samples", "", head, "|---|---|---|---|" + ("---|---|" if pixels else "")]
    for s in samples[:64]:
        lat = s.get("latents") or {}
        row = f"| {s['prompt']} | {s['seed']} | {_db(lat.get('psnr_db'))} | {lat.get('ssim', 0):.5f} |"
        if pixels:
            p = s.get("pixels") or {}
            lpips = f"{p['lpips']:.4f}" if p.get("lpips") is not None else "—"
            row += f" {_db(p.get('psnr_db'))} | {lpips} |"
        lines.append(row)
    if len(samples) > 64:
        lines.append(f"| ... {len(samples) - 64} more in report.json | | | |")
    return lines + [""]


# ------------------------------------------------------------------ baseline gate

def read_baseline(path, settings: dict) -> dict:
    """A baseline report.json, checked as a hostile file, made with the same settings (prompts and seeds
    included: figures over other samples are not comparable)."""
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
        detail = ", ".join(f"{k} {untrusted.shown(theirs.get(k), 40)} there, {untrusted.shown(settings[k], 40)} here"
                           for k in differ)
        raise QConvertError(f"{where}: made with other settings ({detail}); rerun the baseline with these")
    whole = all(isinstance(data.get(k), dict) for k in ("weights", "blocks", "latents"))
    if data.get("complete") is not True or not whole:
        raise CheckpointError(f"{where}: a partial report (or one missing its weights, blocks or latents figures) "
                              "cannot be a baseline")
    for figure, _ in FIGURES:
        value = figure_of(data, figure)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise CheckpointError(f"{where}: {figure} must be a number, not {untrusted.type_name(value)}")
    return data


def _badness(error: float) -> float:
    return math.inf if math.isnan(error) else error


def figure_of(report: dict, figure: str):
    section, key = figure.split(".")
    part = report.get(section)
    return part.get(key) if isinstance(part, dict) else None


def _measured(report: dict, figure: str) -> bool:
    """Whether the report has the figure's section (LPIPS and pixels are optional)."""
    section, key = figure.split(".")
    part = report.get(section)
    return isinstance(part, dict) and key in part and not (key == "lpips" and part.get("lpips") is None)


def gate(report: dict, base: dict, tolerance: float) -> None:
    """Fail on the first mean figure worse than the baseline's beyond ``tolerance`` (a fraction)."""
    for figure, better in FIGURES:
        if not (_measured(report, figure) and _measured(base, figure)):
            continue
        now, then = figure_of(report, figure), figure_of(base, figure)
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
