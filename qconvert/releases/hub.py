"""``qconvert publish``: a model card from a release's manifest, and the upload to the Hugging Face Hub.

The card is written from ``manifest.json`` alone: YAML metadata the Hub reads
(``base_model``, ``base_model_relation: quantized``, ``pipeline_tag``,
``license``, ``library_name``/``tags``), a table of files with sizes and the
figures ``verify`` measured, where each file goes in ComfyUI and how diffusers
or Nunchaku load it, and verify's pictures.  The upload is one
``HfApi.upload_folder`` call (huggingface_hub 2.x streams, commits in parts
and resumes a re-run).  The token comes from ``HF_TOKEN`` or the local login;
it is passed to huggingface_hub and nowhere else: never printed, logged or
written, and scrubbed from any error message that might quote it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qconvert.codecs.comfyui import registry
from qconvert.core.errors import QConvertError
from qconvert.core.io import atomic_output
from qconvert.formats import bfl
from qconvert.releases import manifest

CARD = "README.md"
# What each format family loads in, and what it needs (spec fp8-lora-sampler.md §9, comfy-quant.md §1);
# ComfyUI's layer formats say it in their registry entries
GUIDE = {
    "gguf": ("ComfyUI/models/diffusion_models/", "**Unet Loader (GGUF)** of ComfyUI-GGUF",
             "any GPU, or CPU"),
    "fp8-scaled": ("ComfyUI/models/diffusion_models/", "**Load Diffusion Model** (any ComfyUI with "
                   "scaled_fp8)", "any GPU"),
    "fp8-plain": ("ComfyUI/models/diffusion_models/", "**Load Diffusion Model** (weight dtype fp8)", "any GPU"),
    "comfy-mix": ("ComfyUI/models/diffusion_models/", "**Load Diffusion Model** (ComfyUI with every format the "
                  "mix holds)", "per layer"),
    "svdquant-int4": ("ComfyUI/models/diffusion_models/", "**Nunchaku Qwen-Image DiT Loader** of ComfyUI-nunchaku",
                      "RTX 20/30/40"),
    "svdquant-nvfp4": ("ComfyUI/models/diffusion_models/", "**Nunchaku Qwen-Image DiT Loader** of "
                       "ComfyUI-nunchaku", "RTX 50 (Blackwell)"),
    **{f"diffusers-{fmt}": ("diffusers: `from_single_file` (see below)",
                            f"`BFLQuantizationConfig`, {bfl.MIN_DIFFUSERS}",
                            f"{bfl.NATIVE_ON[fmt]}; dequantized in each forward elsewhere") for fmt in bfl.FORMATS},
}
TAGS = {"gguf": ["gguf"], "diffusers": ["diffusers", "diffusion-single-file"],
        "fp8": ["fp8", "comfyui", "diffusion-single-file"],
        "comfy": ["comfyui", "diffusion-single-file"], "svdquant": ["svdquant", "nunchaku", "comfyui"]}


def guide(fmt: str) -> tuple:
    """(where the file goes, what loads it, which GPUs run it natively) for a manifest's format; ComfyUI's layer
    formats (``comfy-nvfp4``, ``fp8-comfy`` ...) from their registry entries."""
    if fmt in GUIDE:
        return GUIDE[fmt]
    smoothed = fmt.endswith("-smoothed")
    layer = registry.FORMATS.get("fp8" if fmt == "fp8-comfy" else fmt.removeprefix("comfy-").removesuffix("-smoothed"))
    if fmt.startswith(("comfy-", "fp8-comfy")) and layer is not None:
        loads_in = layer.smoothed_loads_in if smoothed else layer.loads_in
        return "ComfyUI/models/diffusion_models/", f"**Load Diffusion Model**, {loads_in}", layer.native_on
    return GUIDE.get(fmt.split("-")[0], ("ComfyUI/models/diffusion_models/", "Load Diffusion Model", ""))


# ------------------------------------------------------------------- card

def card_metadata(m: dict) -> dict:
    card, outputs = m.get("card", {}), m["outputs"]
    source = m.get("source", {}).get("id", "")
    base = card.get("base_model") or (source if re.fullmatch(r"[\w.-]+/[\w.-]+", source) else None)
    if not base:
        raise QConvertError("the manifest names no Hub base model: set [card] base_model in the recipe "
                            "(the source is a local path)")
    bases = [base]
    for entry in outputs.values():
        for lora in entry.get("loras", []):
            spec = lora.get("spec", "") if isinstance(lora, dict) else ""
            if spec.startswith("hf://"):
                repo = "/".join(spec[5:].split("/")[:2])
                if repo not in bases:
                    bases.append(repo)
    families = {e["format"].split("-")[0] for e in outputs.values()}
    tags = ["qconvert", "qwen-image"]
    for family in sorted(families):
        tags += [t for t in TAGS.get(family, []) if t not in tags]
    if any(e.get("loras") for e in outputs.values()):
        tags.append("lightning" if any("ightning" in json.dumps(e.get("loras")) for e in outputs.values())
                    else "lora")
    tags += [t for t in card.get("tags", []) if t not in tags]
    meta = {"base_model": bases if len(bases) > 1 else bases[0], "base_model_relation": "quantized",
            "pipeline_tag": card.get("pipeline_tag") or ("image-to-image" if "edit" in base.lower()
                                                          else "text-to-image"),
            "license": card.get("license", "apache-2.0"), "language": card.get("language", ["en", "zh"]),
            "tags": tags}
    if families == {"gguf"}:
        meta["library_name"] = "gguf"
    if card.get("quantized_by"):
        meta["quantized_by"] = card["quantized_by"]
    return meta


def _yaml(meta: dict) -> str:
    """Card YAML by hand for a fixed shape: strings quoted as JSON (valid YAML), lists as block lists."""
    lines = []
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines)


def _with_interval(v: dict, figure: str, digits: int, unit: str = "") -> str:
    """A card's figure: the mean and its 95% interval, "—" when not measured."""
    section, key = figure.split(".")
    value = (v.get(section) or {}).get(key)
    if value is None:
        return "—"
    low, high = (v.get("intervals") or {}).get(figure, (None, None))
    text = f"{value:.{digits}f}{unit}"
    if low is not None and high is not None and v.get("samples", 1) > 1:
        text += f" ({low:.{digits}f}–{high:.{digits}f})"
    return text


def _gate_lines(outputs: dict, order: list) -> list[str]:
    rows = [(name, g) for name in order for g in outputs[name].get("gates") or []]
    if not rows:
        return []
    out = ["## Gates", "", "Each judged on the 95% interval's bound (a gap: paired over the same samples).", "",
           "| File | Gate | Measured | Verdict |", "|---|---|---|---|"]
    for name, g in rows:
        interval = g.get("interval")
        measured = "—" if g.get("mean") is None else f"{g['mean']:.4g}" + (
            f" ({interval[0]:.4g} to {interval[1]:.4g})" if interval and None not in interval else "")
        verdict = "passed" if g.get("passed") else f"**failed**: {g.get('why')}"
        out.append(f"| `{outputs[name]['file']}` | {g.get('gate')} | {measured} | {verdict} |")
    return out + [""]


def render_card(m: dict, repo: str | None = None, forced: list | None = None) -> str:
    meta = card_metadata(m)
    card, outputs = m.get("card", {}), m["outputs"]
    base = meta["base_model"] if isinstance(meta["base_model"], str) else meta["base_model"][0]
    order = [n for n in m.get("order", []) if n in outputs] + sorted(set(outputs) - set(m.get("order", [])))
    title = card.get("title") or f"{base.split('/')[-1]} — {m['recipe']['name']}"
    out = ["---", _yaml(meta), "---", "", f"# {title}", ""]
    if m["recipe"].get("description"):
        out += [m["recipe"]["description"], ""]
    if forced:
        out += [f"**Published with `--force`** although: {'; '.join(forced)}.", ""]
    out += [f"Quantized from [{base}](https://huggingface.co/{base}) with qconvert {m['qconvert_version']} "
            f"(recipe `{m['recipe']['file']}`). Every file was compared with the original by `qconvert verify`: "
            "each prompt and seed sampled through both on the same noise; each figure below is the mean over those "
            "samples with its 95% interval in brackets (higher PSNR is closer).", ""]
    out += ["## Files", "", "| File | Format | Size | Latent PSNR | Pixel PSNR | Runs natively on |",
            "|---|---|---|---|---|---|"]
    for name in order:
        e = outputs[name]
        v = e.get("verify") or {}
        loras = ", ".join(Path(lora["spec"].rsplit(":", 1)[0] if re.search(r":[\d.]+$", lora["spec"])
                                else lora["spec"]).name for lora in e.get("loras", []))
        level = e.get("options", {}).get("level") if e["format"] == "gguf" else None
        shown_fmt = e["format"] + (f" {level}" if level else "") + (f" + {loras}" if loras else "")
        out.append(f"| `{e['file']}` | {shown_fmt} | {_size(e['bytes'])} | "
                   f"{_with_interval(v, 'latents.psnr_db', 2, ' dB')} | "
                   f"{_with_interval(v, 'pixels.psnr_db', 2, ' dB')} | {guide(e['format'])[2]} |")
    out += [""] + _gate_lines(outputs, order)
    comfy_formats = sorted({outputs[n]["format"] for n in order} - {f"diffusers-{f}" for f in bfl.FORMATS})
    out += ["## ComfyUI", "", "| Format | Put the file in | Load it with |", "|---|---|---|"] if comfy_formats else []
    for fmt in comfy_formats:
        where, node, _ = guide(fmt)
        out.append(f"| {fmt} | `{where}` | {node} |")
    if comfy_formats:
        out += ["", "The text encoder (Qwen2.5-VL 7B) goes in `ComfyUI/models/text_encoders/` and the VAE in "
                "`ComfyUI/models/vae/`, as for the original model.", ""]
    out += _library_usage(outputs, order, repo, base)
    settings = next((outputs[n]["verify"].get("settings") for n in order if outputs[n].get("verify")), None)
    if settings:
        shown = ", ".join(f"{k} {settings[k]}" for k in ("height", "width", "steps", "schedule", "runtime")
                          if k in settings)
        if isinstance(settings.get("prompts"), list) and isinstance(settings.get("seeds"), list):
            shown += (f", {len(settings['prompts'])} prompts x {len(settings['seeds'])} seeds "
                      f"({', '.join(str(p) for p in settings['prompts'][:4])}"
                      f"{', ...' if len(settings['prompts']) > 4 else ''}; seeds "
                      f"{', '.join(str(x) for x in settings['seeds'][:8])})")
        out += ["## How close each file is to the original", "", f"`qconvert verify` ({shown}): the reference "
                "run, this file's run, and their difference.", ""]
        for name in order:
            e = outputs[name]
            pictures = (e.get("verify") or {}).get("pictures") or [] if e.get("report") else []
            want = [p for p in ("reference-pixels.png", "output-pixels.png", "pixel-difference.png") if p in pictures] \
                or [p for p in ("reference.png", "output.png", "difference.png") if p in pictures]
            if want:
                out.append(f"**{name}**: " + " ".join(f"![{name} {p[:-4]}]({e['report']}/{p})" for p in want))
                out.append("")
    out += ["## Reproduce", "", "```sh", "pip install qconvert",
            f"qconvert recipe run {m['recipe']['file']} --out release/", "```", "",
            "`manifest.json` lists every file's sha256, options, source fingerprint and measured figures.", "",
            "Since this is a quantized model, all licensing terms of the original model remain in effect.", ""]
    return "\n".join(out)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _library_usage(outputs: dict, order: list, repo: str | None, base: str) -> list[str]:
    repo = repo or "OWNER/NAME"
    formats = {outputs[n]["format"]: outputs[n]["file"] for n in order}
    out = []
    gguf = next((f for fmt, f in formats.items() if fmt == "gguf"), None)
    if gguf:
        out += ["## diffusers (GGUF)", "", "```python", "import torch",
                "from diffusers import DiffusionPipeline, GGUFQuantizationConfig, QwenImageTransformer2DModel", "",
                "transformer = QwenImageTransformer2DModel.from_single_file(",
                f'    "https://huggingface.co/{repo}/blob/main/{gguf}",',
                "    quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),",
                f'    torch_dtype=torch.bfloat16, config="{base}", subfolder="transformer")',
                f'pipe = DiffusionPipeline.from_pretrained("{base}", transformer=transformer, '
                "torch_dtype=torch.bfloat16)", "```", ""]
    native = next((f for fmt, f in formats.items() if fmt.startswith("diffusers-")), None)
    if native:
        out += ["## diffusers (natively quantized: fp8r / nvfp4)", "", f"Needs {bfl.MIN_DIFFUSERS}.", "",
                "```python", "import torch",
                "from diffusers import BFLQuantizationConfig, DiffusionPipeline, QwenImageTransformer2DModel", "",
                "transformer = QwenImageTransformer2DModel.from_single_file(",
                f'    "https://huggingface.co/{repo}/blob/main/{native}",',
                "    quantization_config=BFLQuantizationConfig(compute_dtype=torch.bfloat16),",
                f'    torch_dtype=torch.bfloat16, config="{base}", subfolder="transformer")',
                f'pipe = DiffusionPipeline.from_pretrained("{base}", transformer=transformer, '
                "torch_dtype=torch.bfloat16)", "```", ""]
    svdq = next((f for fmt, f in formats.items() if fmt.startswith("svdquant")), None)
    if svdq:
        out += ["## Nunchaku", "", "```python", "import torch", "from diffusers import DiffusionPipeline",
                "from nunchaku import NunchakuQwenImageTransformer2DModel", "",
                f'transformer = NunchakuQwenImageTransformer2DModel.from_pretrained("{repo}/{svdq}")',
                f'pipe = DiffusionPipeline.from_pretrained("{base}", transformer=transformer, '
                "torch_dtype=torch.bfloat16)", "```", ""]
    if any(fmt.startswith(("fp8", "comfy")) for fmt in formats):
        out += ["The FP8 and ComfyUI-format files are for ComfyUI (their per-layer `comfy_quant` layout is "
                "ComfyUI's own).", ""]
    return out


# ----------------------------------------------------------------- publish

def operations(folder: Path, m: dict) -> list[tuple[str, int]]:
    """(path in repo, bytes) of every file the upload sends: the card, the manifest, the outputs, the reports."""
    folder = Path(folder)
    ops = [(CARD, -1), (manifest.NAME, (folder / manifest.NAME).stat().st_size)]
    for e in m["outputs"].values():
        ops.append((e["file"], e["bytes"]))
        report = e.get("report")
        if report and (folder / report).is_dir() and not (folder / report).is_symlink():
            ops += [(f"{report}/{p.name}", p.stat().st_size) for p in sorted((folder / report).iterdir())
                    if p.is_file()]
    # a link would upload whatever it points at, anywhere on this machine: only the release's own files go
    linked = [path for path, _ in ops if (folder / path).is_symlink()]
    if linked:
        raise QConvertError(f"{folder}/{linked[0]} is a symbolic link; publish uploads only files in the release "
                            "folder itself (copy it in, or remove it)")
    return ops


def check_files(folder: Path, m: dict, say) -> None:
    """Publish only what the manifest says was built: every file present, with its size and sha256."""
    for name, e in m["outputs"].items():
        problem = manifest.check(folder, e, e["key"])
        if problem:
            raise QConvertError(f"{folder}: output {name}: {problem}; rebuild it with qconvert recipe run")
        say(f"checked {e['file']} (sha256 {e['sha256'][:12]}…)")


def write_card(folder: Path, text: str) -> None:
    with atomic_output(Path(folder) / CARD) as f:
        f.write(text.encode("utf-8"))


def get_token() -> str:
    from huggingface_hub import get_token as hub_token

    token = hub_token()
    if not token:
        raise QConvertError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (publish --dry-run needs "
                            "none)")
    return token


def upload(folder: Path, m: dict, repo: str, *, private: bool, create_pr: bool, token: str) -> str:
    """create_repo (exist_ok) then upload_folder of exactly the operations' files; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    paths = [p for p, _ in operations(folder, m)]
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model", allow_patterns=paths,
                                 commit_message=f"qconvert: {m['recipe']['name']} ({len(m['outputs'])} files)",
                                 create_pr=create_pr)
    except Exception as exc:  # HTTP, auth, network: one line, the token never in it
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise QConvertError(f"upload to {repo} failed: {type(exc).__name__}: "
                            f"{message.replace(token, '<token>')[:300]}") from None
    return str(getattr(info, "commit_url", info) or "")
