"""Every quality table of the README, measured: ``docs/quality.md`` is this script's output.

    python3 benchmarks/bench_quality.py [--work DIR] [--sections all|NAME,...] [--readme] [--pixels]

It makes the test models, converts them with the CLI a user runs, verifies
each file with ``qconvert verify --json`` and writes docs/quality.md: each
table with the settings it was measured under, the commit, and each figure
as the mean over the samples (prompts x seeds, the reference and the file
on the same noise) with its bootstrap 95% interval.  ``--readme`` also
replaces the README's tables between ``<!-- quality:NAME -->`` markers with
this run's; a test checks that every number in those tables is in
docs/quality.md, so the README's figures are never typed by hand.

Tables: ComfyUI formats at both runtimes, diffusers-native files, NVFP4 smoothing, the size-budgeted mixes, GGUF
levels, SVDQuant LoRA modes (the tiny model, about 10 minutes on a 2-core
CPU; the default sections), and the formats and mixes on a model of full
width with two blocks (``--sections full-width-formats,full-width-mixes``:
most of an hour there), and the GGUF policies at city96's sizes on the tiny
model and on one of full width with three blocks
(``--sections full-width-gguf-measured``: hours on a 2-core CPU).  Sections not asked for are kept as they were, each
with the commit it was measured at.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ["--synthetic", "4", "--seeds", "2"]  # 8 held-out samples a file
PIXELS = {"on": False}  # --pixels: decode every sample with the tiny VAE too (about 3x the time on a CPU)


def qconvert(*args, capture: bool = True) -> str:
    cmd = [sys.executable, "-m", "qconvert", *map(str, args)]
    done = subprocess.run(cmd, capture_output=capture, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr}")
    return done.stdout


REUSE = {"on": False}  # --reuse: keep files and reports a killed run left in --work


def verify(path: Path, model: Path, work: Path, *extra) -> dict:
    """verify --json of ``path``; a report already made of this very file (newer than it) is read instead."""
    where = "" if path.parent == work else f"{path.parent.name}-"  # files of one name in several folders
    report = work / "reports" / f"{where}{path.name}-{'-'.join(str(e).strip('-') for e in extra) or 'default'}"
    made = report / "report.json"
    if made.exists() and made.stat().st_mtime > path.stat().st_mtime:
        return json.loads(made.read_text())
    decode = [] if PIXELS["on"] else ["--no-decode"]
    return json.loads(qconvert("verify", path, "--reference", model, "--report", report, *SAMPLES, *extra,
                               *decode, "--json", "-q"))


def convert(path: Path, *args) -> None:
    """One ``qconvert`` conversion to ``path`` (skipped with --reuse when a killed run already made it)."""
    if REUSE["on"] and path.exists():
        return
    qconvert(*args, "-o", path, "-q")


def pixel_head() -> tuple[str, str]:
    return (" pixel PSNR (dB) |", "---|") if PIXELS["on"] else ("", "")


def pixel_cell(r: dict) -> str:
    return f" {cell(r.get('pixels'))} |" if PIXELS["on"] else ""


def cell(section: dict | None, key: str = "psnr_db", digits: int = 2) -> str:
    if not section or section.get(key) is None:
        return "identical" if section else "—"
    low, high = section["interval"][key]
    return f"{section[key]:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def size_of(path: Path) -> str:
    return f"{path.stat().st_size:,}"


# ------------------------------------------------------------------ tables

FORMATS = ("fp8", "nvfp4", "mxfp8", "int8", "int8-row", "int8-tensor", "convrot-w4a4", "w4a8", "w6a8", "awq-w4a16")


def comfy_formats(model: Path, work: Path, formats=FORMATS, both_runtimes: bool = True) -> tuple[list[str], dict]:
    """Every ComfyUI format at the native and (``both_runtimes``) the dequantized runtime."""
    rows, files = [], {}
    for fmt in formats:
        path = work / f"{model.name}-{fmt}.safetensors"
        convert(path, "to-comfy", model, "--format", fmt)
        files[fmt] = path
        native = verify(path, model, work)
        dequantized = verify(path, model, work, "--runtime", "dequantized") if both_runtimes else None
        rows.append(f"| `{fmt}` | {size_of(path)} | {cell(native['latents'])} |"
                    + (f" {cell(dequantized['latents'])} |" if dequantized else "") + pixel_cell(native))
    px, rule = pixel_head()
    head = ["| `--format` | bytes | latent PSNR, native (dB) |" + (" latent PSNR, dequantized (dB) |" if both_runtimes
                                                                  else "") + px,
            "|---|---|---|" + ("---|" if both_runtimes else "") + rule]
    return head + rows, files


MEASURES = (("block, native (default)", []), ("block, chosen for dequantized", ["--runtime", "dequantized"]),
            ("weight", ["--sensitivity", "weight"]))


def mixes(model: Path, work: Path, files: dict, fractions=(0.25, 0.6), measures=MEASURES) -> list[str]:
    """Mixes at budgets between the NVFP4 and INT8 sizes, each measure, verified at the native runtime."""
    nvfp4, int8 = files["nvfp4"].stat().st_size, files["int8"].stat().st_size
    rows = []
    for name, path in (("NVFP4", files["nvfp4"]), ("W4A8", files["w4a8"]), ("ConvRot W4A4", files["convrot-w4a4"])):
        r = verify(path, model, work)
        rows.append(f"| {name} | {size_of(path)} | {cell(r['latents'])} |" + pixel_cell(r))
    for fraction in fractions:
        target = (nvfp4 + (int8 - nvfp4) * fraction) / 1e9
        for label, extra in measures:
            path = work / f"{model.name}-mix-{fraction}-{'-'.join(extra).strip('-') or 'native'}.safetensors"
            convert(path, "to-comfy", model, "--format", "mix", "--target-size", f"{target:.6f}", *extra)
            r = verify(path, model, work)
            rows.append(f"| mix {target * 1e3:.3f} MB, {label} | {size_of(path)} | {cell(r['latents'])} |"
                        + pixel_cell(r))
    for name, key in (("W6A8", "w6a8"), ("FP8", "fp8"), ("INT8 ConvRot", "int8"), ("MXFP8", "mxfp8")):
        r = verify(files[key], model, work)
        rows.append(f"| {name} | {size_of(files[key])} | {cell(r['latents'])} |" + pixel_cell(r))
    px, rule = pixel_head()
    return ["| file | bytes | latent PSNR (dB) |" + px, "|---|---|---|" + rule] + rows


def gguf_levels(model: Path, work: Path) -> list[str]:
    levels = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "IQ4_NL", "Q4_0",
              "IQ4_XS", "Q3_K_M", "Q3_K_S", "Q2_K"]
    folder = work / "gguf"
    qconvert("to-gguf", model, "--level", ",".join(levels), "-o", folder, "-q")
    rows = []
    for level in levels:
        path = next(folder.glob(f"*-{level}.gguf"))
        r = verify(path, model, work)
        rows.append(f"| {level} | {size_of(path)} | {cell(r['latents'])} |" + pixel_cell(r))
    px, rule = pixel_head()
    return ["| level | bytes | latent PSNR (dB) |" + px, "|---|---|---|" + rule] + rows


MEASURED_LEVELS = ("Q4_K_M", "Q3_K_M", "Q2_K")


def gguf_policies(model: Path, work: Path, tag: str) -> list[str]:
    """city96's, QuantStack's and the measured policy at city96's sizes for three levels, without and with an
    importance matrix (``calibrate --synthetic 2`` at 256x256, 4 steps: prompts verify never uses)."""
    calib = work / f"{tag}-calib.safetensors"
    if not (REUSE["on"] and calib.exists()):
        qconvert("calibrate", model, "--synthetic", 2, "--height", 256, "--width", 256, "--steps", 4, "-o", calib,
                 "-q")
    rows = []
    for label, extra in (("no", []), ("yes", ["--imatrix", calib])):
        for policy in ("city96", "quantstack", "measured"):
            folder = work / f"{tag}-gguf-{policy}{'-imatrix' if extra else ''}"
            if not (REUSE["on"] and folder.exists()):
                qconvert("to-gguf", model, "--level", ",".join(MEASURED_LEVELS), "--policy", policy, "-o", folder,
                         "-q", *extra)
        for level in MEASURED_LEVELS:
            for policy in ("city96", "quantstack", "measured"):
                path = next((work / f"{tag}-gguf-{policy}{'-imatrix' if extra else ''}").glob(f"*-{level}.gguf"))
                r = verify(path, model, work)
                shown = "**measured**" if policy == "measured" else policy
                rows.append(f"| {level} | {shown} | {label} | {size_of(path)} | {cell(r['latents'])} |"
                            + pixel_cell(r))
    px, rule = pixel_head()
    return ["| level | `--policy` | imatrix | bytes | latent PSNR (dB) |" + px, "|---|---|---|---|---|" + rule] + rows


def calibration(model: Path, work: Path) -> Path:
    """``calibrate --synthetic 2`` at 256x256, 4 steps: prompts verify never uses (made once a run)."""
    calib = work / f"{model.name}-calib.safetensors"
    if not (calib.exists() and (REUSE["on"] or calib.stat().st_mtime > model.stat().st_mtime)):
        qconvert("calibrate", model, "--synthetic", 2, "--height", 256, "--width", 256, "--steps", 4, "-o", calib,
                 "-q")
    return calib


def diffusers_formats(model: Path, work: Path) -> list[str]:
    """to-diffusers' fp8r and nvfp4 at both runtimes; nvfp4's static input_scale uncalibrated and calibrated
    (``calibration``) at two margins."""
    calib = calibration(model, work)
    files = {"`fp8r`": ("fp8r", []), "`nvfp4`, input_scale 1.0 (no `--calib`)": ("nvfp4", []),
             "`nvfp4 --calib --margin 1.25`": ("nvfp4", ["--calib", calib, "--margin", "1.25"]),
             "`nvfp4 --calib` (margin 4, the default)": ("nvfp4", ["--calib", calib])}
    return runtimes_table(model, work, {
        label: (work / f"{model.name}-diffusers-{i}-{fmt}.safetensors",
                ("to-diffusers", model, "--format", fmt, *extra))
        for i, (label, (fmt, extra)) in enumerate(files.items())})


def nvfp4_smoothing(model: Path, work: Path) -> list[str]:
    """to-comfy nvfp4 plain and with ``--smooth`` (factors chosen on ``calibration``'s rows for either runtime),
    each verified at both runtimes on held-out prompts."""
    calib = calibration(model, work)
    files = {"`nvfp4`": [], "`nvfp4 --smooth --calib` (chosen for the native runtime, the default)":
             ["--smooth", "--calib", calib],
             "`nvfp4 --smooth --calib --runtime dequantized`":
             ["--smooth", "--calib", calib, "--runtime", "dequantized"]}
    return runtimes_table(model, work, {
        label: (work / f"{model.name}-smoothing-{i}.safetensors", ("to-comfy", model, "--format", "nvfp4", *extra))
        for i, (label, extra) in enumerate(files.items())})


def runtimes_table(model: Path, work: Path, files: dict) -> list[str]:
    """One row a file (label -> (path, the qconvert command that makes it)), verified at both runtimes."""
    rows = []
    for label, (path, command) in files.items():
        convert(path, *command)
        native, dequantized = verify(path, model, work), verify(path, model, work, "--runtime", "dequantized")
        rows.append(f"| {label} | {size_of(path)} | {cell(native['latents'])} | {cell(dequantized['latents'])} |"
                    + pixel_cell(native))
    px, rule = pixel_head()
    return ["| file | bytes | latent PSNR, native (dB) | latent PSNR, dequantized (dB) |" + px,
            "|---|---|---|---|" + rule] + rows


def svdquant_lora(model: Path, work: Path) -> list[str]:
    """A LoRA three ways into an SVDQuant INT4 file (rank 16), verified against the source through the LoRA."""
    lora = work / "style-lora.safetensors"
    subprocess.run([sys.executable, "-c", "import sys; from qconvert.core import tiny; "
                    "tiny.make_tiny_lora(sys.argv[1], sys.argv[2])", str(lora), str(model)], check=True, cwd=ROOT)
    base = work / "svdq-base.safetensors"
    qconvert("to-svdquant", model, "--rank", "16", "-o", base, "-q")
    ways = {"baked, then quantized (`--lora`)": ["to-svdquant", model, "--rank", "16", "--lora", lora],
            "appended to the branch (`--lora-mode lowrank`)": ["to-svdquant", model, "--rank", "16", "--lora", lora,
                                                               "--lora-mode", "lowrank"],
            "baked into the SVDQuant file (`bake-lora`, back to rank 16)": ["bake-lora", base, "--lora", lora]}
    rows = []
    for i, (label, args) in enumerate(ways.items()):
        path = work / f"svdq-lora-{i}.safetensors"
        qconvert(*args, "-o", path, "-q")
        r = verify(path, model, work, "--lora", lora)
        rows.append(f"| {label} | {size_of(path)} | {cell(r['latents'])} |" + pixel_cell(r))
    px, rule = pixel_head()
    return ["| the LoRA | bytes | latent PSNR (dB) |" + px, "|---|---|---|" + rule] + rows


# ------------------------------------------------------------------ output

def provenance() -> str:
    """Where and from what a section was measured."""
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return (f"Measured at commit {commit.stdout.strip()}{' (with uncommitted changes)' if dirty else ''}, "
            f"{datetime.date.today().isoformat()}, torch {torch.__version__}, {platform.machine()} CPU "
            f"({torch.backends.cpu.get_cpu_capability()}), "
            f"{os.cpu_count()} cores, by `python3 benchmarks/bench_quality.py --sections NAME"
            f"{' --pixels' if PIXELS['on'] else ''}`.")


def header() -> list[str]:
    from qconvert.running.defaults import VERIFY

    shown = ", ".join(f"{k} {v}" for k, v in VERIFY.items() if k not in ("synthetic", "seeds"))
    return ["# Measured quality", "",
            "Generated by `python3 benchmarks/bench_quality.py`; do not edit by hand, run it again (`--sections` "
            "measures some tables again and keeps the others).", "",
            f"- verify at its defaults ({shown}) over {SAMPLES[1]} held-out synthetic prompts x {SAMPLES[3]} seeds: "
            f"each figure is the mean over those {int(SAMPLES[1]) * int(SAMPLES[3])} samples, the reference and the "
            "file on the same noise, and in brackets its bootstrap 95% interval",
            "- the tiny model is `qconvert make-tiny` (3 blocks, inner dim 256); the full-width ones have the real "
            "width (`make-tiny --layers 2 --heads 24 --head-dim 128 --text-dim 3584`; `--layers 3` for the GGUF "
            "policies)", ""]


def kept_sections(path: Path) -> dict:
    """{name: (title, the lines under it)} of an existing docs/quality.md."""
    if not path.exists():
        return {}
    found = {}
    for part in re.split(r"^## ", path.read_text(), flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        name = re.search(r"<!-- table:([\w-]+) -->", body)
        if name:
            found[name.group(1)] = (title, body.strip("\n").splitlines())
    return found


def replace_readme(sections: dict) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, lines in sections.items():
        pattern = re.compile(rf"(<!-- quality:{name} -->\n).*?(<!-- /quality:{name} -->)", re.S)
        if not pattern.search(text):
            print(f"README has no <!-- quality:{name} --> block; left as it is", file=sys.stderr)
            continue
        text = pattern.sub(lambda m: m.group(1) + "\n".join(lines) + "\n" + m.group(2), text)
    readme.write_text(text)


TITLES = {"comfy-formats": "ComfyUI formats, tiny model",
          "diffusers-formats": "diffusers-native files (`to-diffusers`), tiny model",
          "nvfp4-smoothing": "NVFP4 with AWQ-style smoothing (`to-comfy --smooth`), tiny model",
          "mixes": "Size-budgeted mixes, tiny model (native runtime; budgets a quarter and 60% of the way from the "
                   "NVFP4 size to the INT8 one)",
          "gguf-levels": "GGUF levels, tiny model",
          "svdquant-lora": "SVDQuant INT4 with a LoRA, tiny model (rank 16, a rank-4 LoRA; verified against the "
                           "source through the LoRA)",
          "full-width-formats": "ComfyUI formats, full-width model of two blocks (native runtime)",
          "full-width-mixes": "Size-budgeted mixes, full-width model of two blocks (native runtime; budgets a "
                              "quarter and 60% of the way from the NVFP4 size to the INT8 one)",
          "gguf-measured": "GGUF policies at city96's sizes, tiny model (`--policy measured` within city96's "
                           "file size at each level)",
          "full-width-gguf-measured": "GGUF policies at city96's sizes, full-width model of three blocks"}
TINY = ("comfy-formats", "diffusers-formats", "nvfp4-smoothing", "mixes", "gguf-levels", "gguf-measured",
        "svdquant-lora")
WIDE = ("full-width-formats", "full-width-mixes")
WIDE3 = ("full-width-gguf-measured",)


def measure(names: set, work: Path) -> dict:
    """{section: table lines} for the sections asked for."""
    out = {}
    if names & set(TINY):
        tiny = work / "tiny"
        if not tiny.exists():
            qconvert("make-tiny", tiny, "--vae", "-q")
        files = None
        if names & {"comfy-formats", "mixes"}:
            print("ComfyUI formats (tiny) ...", file=sys.stderr)
            out["comfy-formats"], files = comfy_formats(tiny, work)
        if "mixes" in names:
            print("mixes (tiny) ...", file=sys.stderr)
            out["mixes"] = mixes(tiny, work, files)
        if "diffusers-formats" in names:
            print("diffusers-native files (tiny) ...", file=sys.stderr)
            out["diffusers-formats"] = diffusers_formats(tiny, work)
        if "nvfp4-smoothing" in names:
            print("NVFP4 smoothing (tiny) ...", file=sys.stderr)
            out["nvfp4-smoothing"] = nvfp4_smoothing(tiny, work)
        if "gguf-levels" in names:
            print("GGUF levels (tiny) ...", file=sys.stderr)
            out["gguf-levels"] = gguf_levels(tiny, work)
        if "gguf-measured" in names:
            print("GGUF policies (tiny) ...", file=sys.stderr)
            out["gguf-measured"] = gguf_policies(tiny, work, "tiny")
        if "svdquant-lora" in names:
            print("SVDQuant LoRA modes (tiny) ...", file=sys.stderr)
            out["svdquant-lora"] = svdquant_lora(tiny, work)
    if names & set(WIDE):
        wide = work / "full-width"
        if not wide.exists():
            qconvert("make-tiny", wide, "--layers", 2, "--heads", 24, "--head-dim", 128, "--text-dim", 3584, "-q")
        print("full width ...", file=sys.stderr)
        # the formats the mixes are measured against, at the native runtime; the mix as its default chooses
        lines, wide_files = comfy_formats(wide, work, ("fp8", "nvfp4", "mxfp8", "int8", "convrot-w4a4", "w4a8", "w6a8",
                                                       "awq-w4a16"), False)
        out["full-width-formats"] = lines
        if "full-width-mixes" in names:
            out["full-width-mixes"] = mixes(wide, work, wide_files, measures=MEASURES[:1])
    if names & set(WIDE3):
        wide3 = work / "full-width-3"
        if not wide3.exists():
            qconvert("make-tiny", wide3, "--layers", 3, "--heads", 24, "--head-dim", 128, "--text-dim", 3584, "-q")
        print("full width, three blocks ...", file=sys.stderr)
        out["full-width-gguf-measured"] = gguf_policies(wide3, work, "wide3")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="Folder for the models and files (default: temp)")
    parser.add_argument("--sections", default=",".join(TINY),
                        help=f"Comma list of tables to measure (the others are kept): {', '.join(TITLES)}, or all")
    parser.add_argument("--readme", action="store_true", help="Replace the README's quality tables with these")
    parser.add_argument("--pixels", action="store_true", help="Decode every sample with the tiny VAE too (slower)")
    parser.add_argument("--reuse", action="store_true", help="Keep the files a killed run left in --work")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality.md")
    args = parser.parse_args()
    PIXELS["on"], REUSE["on"] = args.pixels, args.reuse
    names = set(TITLES) if args.sections == "all" else {n.strip() for n in args.sections.split(",") if n.strip()}
    unknown = names - set(TITLES)
    if unknown:
        parser.error(f"--sections: no table {sorted(unknown)[0]} (choose {', '.join(TITLES)})")
    work = args.work or Path(tempfile.mkdtemp(prefix="qconvert-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    kept = kept_sections(args.out)
    made = measure(names, work)
    where = provenance()
    out = header()
    tables = {}
    for name, title in TITLES.items():
        if name in made:
            body = [where, "", f"<!-- table:{name} -->", *made[name]]
        elif name in kept:
            body = kept[name][1]
        else:
            continue
        out += [f"## {title}", "", *body, ""]
        marker = body.index(f"<!-- table:{name} -->")
        tables[name] = body[marker + 1:]
    args.out.write_text("\n".join(out))
    print(f"wrote {args.out}", file=sys.stderr)
    if args.readme:
        replace_readme(tables)


if __name__ == "__main__":
    main()
