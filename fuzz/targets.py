"""Fuzz targets: every reader of qconvert, fed bytes it did not write.

Each target takes one input (bytes), writes it where the reader expects a
file, and runs the reader the way the CLI and the Python API do.  The
contract under test: a reader either succeeds or raises a ``QConvertError``
whose message is printable on one line.  Anything else (another exception, a
hang, runaway memory) is a finding; ``fuzz/run.py`` sets the time and memory
limits.

Seeds are files qconvert makes itself (``seeds(name)``), so nothing binary
is committed.  A folder input (config, index, shards) is one byte string cut
at ``PART`` markers, so the fuzzer mutates all of its files at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

PART = b"\n--qconvert-fuzz-part--\n"
FOLDER_FILES = ("config.json", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model-00001-of-00002.safetensors",
                "diffusion_pytorch_model-00002-of-00002.safetensors")
# Seeds stay small (a few tens of KB) so mutations land in headers, not in data.
TINY = {"layers": 1, "heads": 2, "head_dim": 16, "text_dim": 32}


def _scratch() -> Path:
    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="qconvert-fuzz-", dir=root))


_SCRATCH: Path | None = None


def scratch() -> Path:
    """A per-process folder for the inputs (in memory where /dev/shm exists)."""
    global _SCRATCH
    if _SCRATCH is None or not _SCRATCH.exists():
        _SCRATCH = _scratch()
    return _SCRATCH


def _file(name: str, data: bytes) -> Path:
    path = scratch() / name
    path.write_bytes(data)
    return path


def check_message(exc: BaseException) -> None:
    """A QConvertError must survive printing: valid Unicode, one line once the CLI shows it."""
    from qconvert.cli import _printable

    str(exc).encode("utf-8")
    line = _printable(exc)
    if "\n" in line or "\r" in line or len(line) > 2200:
        raise AssertionError(f"error message not fit for one line: {line[:200]!r}")


@contextlib.contextmanager
def expected_errors():
    from qconvert.core.errors import QConvertError

    try:
        yield
    except QConvertError as exc:
        check_message(exc)


# ------------------------------------------------------------------ targets

def library_agrees(path: Path) -> None:
    """Every safetensors file qconvert's header check accepts, the safetensors library opens, with the same
    tensors and bytes: qconvert is never the only reader that takes a file."""
    import torch
    from safetensors import safe_open

    from qconvert.core.checkpoint import TensorReader, read_safetensors_header

    header = read_safetensors_header(path)  # a QConvertError here is the caller's expected outcome
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            metadata = f.metadata() or {}
            reader = TensorReader()
            for key in sorted(header.tensors)[:8]:
                ours, theirs = reader.read(header.tensors[key]), f.get_tensor(key)
                same_bytes = torch.equal(ours.reshape(-1).view(torch.uint8), theirs.reshape(-1).view(torch.uint8))
                if ours.dtype != theirs.dtype or ours.shape != theirs.shape or not same_bytes:
                    raise AssertionError(f"tensor {key!r} reads differently from the safetensors library")
            reader.close()
    except AssertionError:
        raise
    except Exception as exc:
        raise AssertionError(f"qconvert accepts a file the safetensors library refuses: {exc}") from None
    if keys != set(header.tensors) or metadata != header.metadata:
        raise AssertionError("qconvert and the safetensors library see different tensors or metadata")


def safetensors_file(data: bytes) -> None:
    """A single .safetensors: header check (against the safetensors library), inspect, open as a
    source, read every tensor, convert."""
    from qconvert.core.checkpoint import open_checkpoint
    from qconvert.formats.inspection import format_summary, inspect_path

    path = _file("model.safetensors", data)
    with expected_errors():
        library_agrees(path)
    with expected_errors():
        format_summary(inspect_path(path))
    with expected_errors():
        with open_checkpoint(path, allow_extra=True) as ckpt:
            for name in ckpt.names():
                ckpt.load(name)
            converted(ckpt)


def converted(ckpt) -> None:
    """What qconvert writes from a source it accepted must pass its own readers (and so ggml's rules)."""
    from qconvert.formats.comfyui import fp8
    from qconvert.formats.comfyui import loader as fp8_loader
    from qconvert.formats.gguf import writer
    from qconvert.formats.gguf.reader import check_header

    for layout in ("comfy", "scaled"):
        out = scratch() / f"out-{layout}.safetensors"
        fp8.convert(ckpt, out, fp8.make_options(layout), quiet=True)
        fp8_loader.layer_formats(out)  # reads the header, every layer config and every scale back
    plans = writer.plan_files(ckpt, ["Q4_K_M", "BF16"], policy="city96", dry_run=True)
    out = scratch() / "out.gguf"
    writer.write_gguf(ckpt, plans[1:], [out], quiet=True)  # BF16: a copy, cheap enough per input
    check_header(out)
    ggml = _ggml_loader()
    if ggml is not None and not ggml.loads(out):
        raise AssertionError("ggml's gguf_init_from_file refuses a GGUF that qconvert wrote")


def folder(data: bytes) -> None:
    """A diffusers folder: the transformer's config.json, shard index and two shards, then model_index.json
    (which tells an Edit model), cut from one input at PART."""
    from qconvert.core.checkpoint import open_checkpoint
    from qconvert.formats.inspection import format_summary, inspect_path

    root = scratch() / "folder"
    shutil.rmtree(root, ignore_errors=True)
    (root / "transformer").mkdir(parents=True)
    for name, part in zip(FOLDER_FILES + ("../model_index.json",), data.split(PART)):
        (root / "transformer" / name).write_bytes(part)
    for shard in FOLDER_FILES[2:]:
        if (root / "transformer" / shard).exists():
            with expected_errors():
                library_agrees(root / "transformer" / shard)
    with expected_errors():
        with open_checkpoint(root) as ckpt:   # reads model_index.json's pipeline class too
            for name in ckpt.names()[:4]:
                ckpt.load(name)
    with expected_errors():
        format_summary(inspect_path(root))


def gguf_file(data: bytes) -> None:
    """A .gguf given to inspect (header check, then gguf-py's reader)."""
    from qconvert.formats.gguf.reader import open_gguf
    from qconvert.formats.inspection import format_summary, inspect_path

    path = _file("model.gguf", data)
    with expected_errors():
        reader = open_gguf(path)
        for t in reader.tensors:
            t.data.tobytes()  # every tensor's bytes are inside the file
        ggml = _ggml_loader()
        if ggml is not None and not ggml.loads(path):
            raise AssertionError("qconvert accepted a GGUF file that ggml's gguf_init_from_file refuses")
    with expected_errors():
        format_summary(inspect_path(path))


_GGML = []


def _ggml_loader():
    """ggml's own loader (from llama-cpp-python's libggml), when installed: the verdict that counts."""
    if not _GGML:
        from tests.ggml_oracle import gguf_loader

        _GGML.append(gguf_loader()[0])
    return _GGML[0]


_MODEL = None


def _lora_model():
    """The tiny model every LoRA input is merged into (made once per process)."""
    global _MODEL
    if _MODEL is None:
        from qconvert.core import tiny
        from qconvert.core.checkpoint import open_checkpoint

        _MODEL = open_checkpoint(tiny.make_tiny(scratch() / "lora-model", **TINY))
    return _MODEL


_RUNNABLE = []


def _runnable_model():
    """A tiny model the reference network can run (RoPE axes must be even: head_dim 32)."""
    if not _RUNNABLE:
        from qconvert.core import tiny
        from qconvert.core.checkpoint import open_checkpoint

        _RUNNABLE.append(open_checkpoint(tiny.make_tiny(scratch() / "runnable-model", layers=1, heads=2,
                                                        head_dim=32, text_dim=32)))
    return _RUNNABLE[0]


def lora_file(data: bytes) -> None:
    """A LoRA: read, map onto the model, merge every tensor it patches."""
    from qconvert.core.lora import with_loras

    model = _lora_model()
    path = _file("lora.safetensors", data)
    with expected_errors():
        library_agrees(path)
    for ignore in (False, True):
        with expected_errors():
            view = with_loras(model, [f"{path}:0.5"], ignore_unmatched=ignore, warn=lambda _: None)
            for name in view.patched_names():
                view.load(name)
            for lora in view.loras:
                lora.close()


def fp8_file(data: bytes) -> None:
    """An FP8 file given to the dequantizing loader (the diffusers path) and to inspect."""
    from qconvert.formats.comfyui.loader import fp8_layout, load_dequantized
    from qconvert.formats.inspection import format_summary, inspect_path

    path = _file("fp8.safetensors", data)
    with expected_errors():
        library_agrees(path)
    with expected_errors():
        fp8_layout(path)
        load_dequantized(path)
    with expected_errors():
        format_summary(inspect_path(path))


def diffusers_file(data: bytes) -> None:
    """A diffusers-native fp8r/nvfp4 file (to-diffusers) opened as verify opens it, every tensor read as it
    runs, and inspected."""
    from qconvert.formats.inspection import format_summary, inspect_path
    from qconvert.formats.opener import open_output

    path = _file("diffusers.safetensors", data)
    with expected_errors():
        library_agrees(path)
    with expected_errors():
        source, _ = open_output(path)
        for name in source.names():
            source.load(name)
        for layer in getattr(source, "layers", {}):
            source.layer_tensors(layer, scales_only=True)
    with expected_errors():
        format_summary(inspect_path(path))


def sampler_inputs(data: bytes) -> None:
    """A file given to ``qconvert sample``: embeddings, noise or reference latents (by the names it holds)."""
    from qconvert.core.checkpoint import read_safetensors_header
    from qconvert.running import inputs

    path = _file("inputs.safetensors", data)
    config = _lora_model().config
    with expected_errors():
        names = read_safetensors_header(path).tensors
        if "noise" in names:
            inputs.read_noise(path, 32, 32)
        elif "image_latents" in names:
            inputs.read_image_latents(path)
        else:
            inputs.read_prompt(path, config)


def imatrix_file(data: bytes) -> None:
    """An importance matrix given to ``to-gguf --imatrix``: llama.cpp's GGUF format or qconvert's own."""
    from qconvert.formats.gguf.imatrix import read_imatrix

    model = _runnable_model()
    kind = "imatrix.gguf" if data[:4] == b"GGUF" else "calib.safetensors"
    path = _file(kind, data)
    with expected_errors():
        read_imatrix(path, model)


BASELINE_SETTINGS = {"height": 32, "width": 48, "steps": 2, "cfg": 1.0, "schedule": "lightning",
                     "prompts": ["synthetic:0"], "seeds": [0, 1], "decode": "off", "dtype": "float32",
                     "runtime": "native"}


def verify_baseline(data: bytes) -> None:
    """A report.json given to ``qconvert verify --baseline``: read, then gated against."""
    from qconvert.running.report import gate, read_baseline

    path = _file("report.json", data)
    with expected_errors():
        base = read_baseline(path, BASELINE_SETTINGS)
        gate(_REPORT, base, 0.05)


_REPORT = {"complete": True, "weights": {"worst_rel_rmse": 0.01, "mean_rel_rmse": 0.001, "worst_layer": "x"},
           "blocks": {"worst_rel_rmse": 0.02, "worst_block": 0},
           "latents": {"psnr_db": 40.0, "ssim": 0.99, "rel_rmse": 0.02}}


def _baseline_report() -> dict:
    from qconvert.running.report import SCHEMA_VERSION

    samples = [{"prompt": "synthetic:0", "seed": seed, "latents": {"psnr_db": 40.0 + seed, "ssim": 0.99,
                                                                   "cosine": 0.999, "rel_rmse": 0.02}}
               for seed in (0, 1)]
    return {"schema_version": SCHEMA_VERSION, "settings": BASELINE_SETTINGS, **_REPORT, "samples": samples,
            "per_layer": [{"name": "x", "role": "img_q", "rel_rmse": 0.01, "cosine": 0.99}]}


def gate_report(data: bytes) -> None:
    """A release's reports/NAME/report.json as the gates read it: every gate judged, against itself too."""
    from qconvert.releases import gates

    folder = scratch() / "release"
    (folder / "reports" / "o").mkdir(parents=True, exist_ok=True)
    (folder / "reports" / "o" / "report.json").write_bytes(data)
    report = gates.read_report(folder, {"report": "reports/o"})
    for gate in (gates.Gate("latents.psnr_db", "min", 30.0), gates.Gate("weights.worst_rel_rmse", "max", 0.1),
                 gates.Gate("pixels.lpips", "max", 0.1), gates.Gate("latents.ssim", "max_gap", 0.01, "o")):
        verdict = gates.judge(gate, report, report)
        assert isinstance(verdict["passed"], bool) and (verdict["passed"] or verdict["why"])


def vae_config(data: bytes) -> None:
    """A VAE folder's config.json (verify decodes with the reference's vae/): checked before anything is built."""
    from qconvert.running.decode import _config

    folder = scratch() / "vae"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(data)
    with expected_errors():
        config = _config(folder)
        assert config["z_dim"] == 16 and len(config["latents_std"]) == 16 and config["base_dim"] <= 1024


SVDQ_TINY = {"layers": 1, "heads": 1, "head_dim": 128, "text_dim": 64}


def svdquant_file(data: bytes) -> None:
    """An SVDQuant file given to verify (its weights and its emulated layers) and to inspect."""
    import torch

    from qconvert.formats.inspection import format_summary, inspect_path
    from qconvert.formats.svdquant.file import SVDQuantFile, is_svdquant
    from qconvert.running.providers import native_provider

    path = _file("svdq.safetensors", data)
    with expected_errors():
        library_agrees(path)
    with expected_errors():
        if not is_svdquant(path):
            return
        f = SVDQuantFile(path)
        for name in ("transformer_blocks.0.attn.to_k.weight", "transformer_blocks.0.img_mlp.net.2.bias",
                     "transformer_blocks.0.img_mod.1.weight", "img_in.weight"):
            f.load(name)
        provider = native_provider(f)
        x = torch.ones(1, 2, f.config.inner_dim)
        for module in ("transformer_blocks.0.attn.to_v", "transformer_blocks.0.txt_mod.1"):
            provider.linear(module)(x)
        f.close()
    with expected_errors():
        format_summary(inspect_path(path))


def recipe_file(data: bytes) -> None:
    """A recipe given to ``recipe run``: parsed and checked against every converter's options."""
    from qconvert.releases import recipes

    path = _file("recipe.toml", data)
    with expected_errors():
        r = recipes.load(path)
        assert r.outputs and len({o.name for o in r.outputs}) == len(r.outputs)
        for o in r.outputs:
            assert "/" not in o.file and not o.file.startswith(".")


def manifest_file(data: bytes) -> None:
    """A release folder's manifest.json (recipe run resumes from it, publish writes the card from it)."""
    from qconvert.releases import hub, manifest

    folder = scratch() / "release"
    folder.mkdir(exist_ok=True)
    (folder / manifest.NAME).write_bytes(data)
    with expected_errors():
        m = manifest.read(folder, required=True)
        for entry in m["outputs"].values():
            manifest.check(folder, entry, entry["key"])
        if m["outputs"]:
            hub.render_card(m, "owner/name")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "safetensors": safetensors_file,
    "folder": folder,
    "gguf": gguf_file,
    "lora": lora_file,
    "fp8": fp8_file,
    "diffusers": diffusers_file,
    "sampler-inputs": sampler_inputs,
    "verify-baseline": verify_baseline,
    "gate-report": gate_report,
    "imatrix": imatrix_file,
    "vae-config": vae_config,
    "svdquant": svdquant_file,
    "recipe": recipe_file,
    "manifest": manifest_file,
}


# -------------------------------------------------------------------- seeds

def seeds(name: str) -> list[bytes]:
    """Inputs qconvert writes itself, for the named target."""
    from qconvert.core import tiny

    work = scratch() / f"seeds-{name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    if name == "safetensors":
        return [tiny.make_tiny_single_file(work / f"{v}.safetensors", **TINY, variant=v).read_bytes()
                for v in tiny.VARIANTS]
    if name == "folder":
        out = []
        for v in tiny.VARIANTS:
            t = tiny.make_tiny(work / v, **TINY, variant=v) / "transformer"
            out.append(PART.join([*((t / f).read_bytes() for f in FOLDER_FILES),
                                  (t.parent / "model_index.json").read_bytes()]))
        return out
    if name == "gguf":
        return _gguf_seeds(work)
    if name == "lora":
        config = _lora_model().config
        return [tiny.make_tiny_lora(work / f"{s}.safetensors", config, style=s, rank=2,
                                    alpha=None if s == "peft" else 1.0).read_bytes() for s in tiny.LORA_STYLES]
    if name == "fp8":
        return _fp8_seeds(work)
    if name == "diffusers":
        from qconvert.core.checkpoint import open_checkpoint
        from qconvert.formats import bfl

        with open_checkpoint(tiny.make_tiny(work / "model", **TINY)) as src:
            return [Path(bfl.convert(src, work / f"{fmt}.safetensors", bfl.make_options(fmt), quiet=True)["output"])
                    .read_bytes() for fmt in bfl.FORMATS]
    if name == "sampler-inputs":
        return _sampler_seeds(work)
    if name == "imatrix":
        return _imatrix_seeds(work)
    if name == "verify-baseline":
        import json

        return [json.dumps(_baseline_report(), indent=2).encode()]
    if name == "gate-report":
        import json

        return [json.dumps(_baseline_report(), indent=2).encode()]
    if name == "svdquant":
        from qconvert.converters.svdquant import SvdqOptions, convert
        from qconvert.core.checkpoint import open_checkpoint

        model = tiny.make_tiny(work / "m", **SVDQ_TINY)
        out = []
        for precision in ("int4", "nvfp4"):
            target = work / f"{precision}.safetensors"
            options = SvdqOptions(precision, 16, grid=2, calib_prompts=1, calib_steps=2, calib_size=64)
            convert(open_checkpoint(model), target, options, quiet=True)
            out.append(target.read_bytes())
        return out
    if name == "recipe":
        return [p.read_bytes() for p in sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))]
    if name == "manifest":
        return [_manifest_seed(work)]
    if name == "vae-config":
        import json

        return [json.dumps(tiny.TINY_VAE, indent=2).encode()]
    raise KeyError(name)


def hostile_seeds(name: str, good: list[bytes]) -> list[bytes]:
    """Hostile inputs of the classes found by hand (issue 20), made from the target's good seeds: each must be
    refused with one QConvertError line, never pass silently or crash.  The corpus starts from them too."""
    if name == "recipe":  # tomllib recurses per level: once an internal RecursionError
        return [b'[recipe]\nname = "r"\nsource = "x"\nz = ' + b"[" * 5000 + b"]" * 5000 + b"\n"]
    if name == "fp8":  # a name outside the model (an absurd block index) given to the diffusers-facing loader;
        # smoothing factors that are NaN, zero, of the wrong length, or on a layer ComfyUI would not apply them to
        factor = "transformer_blocks.0.attn.to_q.pre_quant_scale"
        return [_with_tensors(good[0], {"transformer_blocks.999999.attn.to_q.weight": ("zeros", (4, 4))}),
                _with_tensors(good[-1], {factor: ("nan", None)}), _with_tensors(good[-1], {factor: ("zeros", None)}),
                _with_tensors(good[-1], {factor: ("zeros", (3,))}),
                _with_tensors(good[-1], {"transformer_blocks.0.img_mod.1.pre_quant_scale": ("zeros", (3,))})]
    if name == "diffusers":  # NaN scales; a scale that contradicts its weight's shape
        scale = "transformer_blocks.0.attn.to_q.weight_scale"
        return [_with_tensors(good[0], {scale: ("nan", None)}), _with_tensors(good[1], {scale: ("zeros", (3,))}),
                _with_tensors(good[1], {"transformer_blocks.0.attn.to_q.input_scale": ("nan", None)})]
    if name == "folder":  # a model_index.json whose pipeline class is not a string, or which is not an object
        parts = good[0].split(PART)
        return [PART.join([*parts[:4], index]) for index in (b'{"_class_name": ["QwenImageEditPlusPipeline"]}',
                                                             b'["QwenImageEditPlusPipeline"]')]
    if name == "svdquant":  # damaged smoothing factors; metadata whose group size contradicts the tensors
        import json

        smooth = "transformer_blocks.0.attn.to_qkv.smooth_factor"
        out = [_with_tensors(good[0], {smooth: (fill, None)}) for fill in ("nan", "zeros")]
        meta = _metadata(good[0])
        q = json.loads(meta["quantization_config"])
        q["weight"]["group_size"] = 0
        out.append(_with_tensors(good[0], {}, {**meta, "quantization_config": json.dumps(q)}))
        return out
    return []


def _metadata(data: bytes) -> dict:
    import json
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__", {})


def _with_tensors(data: bytes, changes: dict, metadata: dict | None = None) -> bytes:
    """A safetensors file's bytes with tensors replaced or added: (fill, shape or None for the stored one)."""
    import torch
    from safetensors import safe_open

    from qconvert.core.io import write_safetensors

    path = _file("hostile-source.safetensors", data)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, (fill, shape) in changes.items():
        like = tensors.get(key)
        shape = tuple(like.shape) if shape is None else shape
        dtype = like.dtype if like is not None else torch.bfloat16
        tensors[key] = torch.full(shape, float(fill), dtype=dtype) if fill == "nan" else torch.zeros(shape, dtype=dtype)
    out = path.with_name("hostile.safetensors")
    write_safetensors(out, tensors, metadata if metadata is not None else _metadata(data))
    return out.read_bytes()


def _manifest_seed(work: Path) -> bytes:
    """The manifest of a small release of the tiny model (two GGUF levels, verified, one with an imatrix from
    the recipe's calibration)."""
    from qconvert.cli import main
    from qconvert.core import tiny

    model = tiny.make_tiny(work / "model", layers=1, heads=2, head_dim=32, text_dim=32)  # runnable: verify
    recipe = work / "r.toml"
    recipe.write_text(f"""[recipe]\nname = "seed"\nsource = "{model}"\n[card]\nbase_model = "Qwen/Qwen-Image"\n
[verify]\nheight = 32\nwidth = 32\nsteps = 1\ndecode = false\n
[calibrate]\nsynthetic = 1\nheight = 32\nwidth = 32\nsteps = 2\n
[[output]]\nconverter = "to-gguf"\nlevels = ["Q8_0", "Q4_0"]\nfile = "m-{{level}}.gguf"\n
[[output]]\nconverter = "to-gguf"\nname = "Q4_0i"\nlevel = "Q4_0"\nimatrix = "recipe"\nfile = "m-Q4_0i.gguf"\n""")
    try:
        main(["recipe", "run", str(recipe), "--out", str(work / "release"), "-q"])
    except SystemExit as exc:
        if exc.code:
            raise RuntimeError(f"the manifest seed's recipe run failed ({exc.code})") from None
    return (work / "release" / "manifest.json").read_bytes()


def _gguf_seeds(work: Path) -> list[bytes]:
    from qconvert.core import tiny
    from qconvert.core.checkpoint import open_checkpoint
    from qconvert.formats.gguf import writer

    with open_checkpoint(tiny.make_tiny(work / "model", **TINY)) as src:
        levels = ["BF16", "Q8_0", "Q4_K_M"]
        paths = [work / f"m-{level}.gguf" for level in levels]
        plans = writer.plan_files(src, levels, policy="city96")
        writer.write_gguf(src, plans, paths, quiet=True)
    return [p.read_bytes() for p in paths]


def _fp8_seeds(work: Path) -> list[bytes]:
    import json

    from qconvert.core import tiny
    from qconvert.core.checkpoint import open_checkpoint
    from qconvert.core.io import write_safetensors
    from qconvert.formats.comfyui import fp8
    from qconvert.formats.comfyui import loader as fp8_loader

    out = []
    with open_checkpoint(tiny.make_tiny(work / "model", **TINY)) as src:
        for layout in fp8.LAYOUTS:
            r = fp8.convert(src, work / f"{layout}.safetensors", fp8.make_options(layout), quiet=True)
            out.append(Path(r["output"]).read_bytes())
    # ComfyUI's block formats (the loader decodes them for verify): a model whose inputs allow ConvRot
    from qconvert.formats.comfyui import writer as comfy

    with open_checkpoint(tiny.make_tiny(work / "wide", **{**SVDQ_TINY, "heads": 2})) as src:
        for fmt in ("nvfp4", "mxfp8", "int8", "int8-tensor", "w4a8", "w6a8", "awq-w4a16"):
            r = comfy.convert(src, work / f"{fmt}.safetensors", comfy.make_options(fmt), quiet=True)
            out.append(Path(r["output"]).read_bytes())
        # NVFP4 with pre_quant_scale (to-comfy --smooth), factors varied across the inputs
        import dataclasses

        import torch

        options = dataclasses.replace(comfy.make_options("nvfp4"), smoothing=(("seed", "linspace"),))
        r = comfy.convert(src, work / "smoothed.safetensors", options, quiet=True,
                          smoother=lambda layer, w: torch.linspace(0.5, 2.0, w.shape[1]).to(torch.bfloat16))
        smoothed = Path(r["output"]).read_bytes()
    # ComfyUI's other spelling: layer configs in __metadata__, keys under model.diffusion_model.
    tensors = dict(fp8_loader.iter_dequantized(work / "comfy.safetensors", dtype=torch_bf16()))
    layers = {}
    for name in list(tensors):
        if name.endswith("to_q.weight"):
            q, scale = fp8.quantize_fp8(tensors[name], fp8.FP8_TYPES["e4m3fn"])
            tensors[name], tensors[name[:-len("weight")] + "weight_scale"] = q, scale
            layers[name[:-len(".weight")]] = {"format": "float8_e4m3fn"}
    prefixed = {"model.diffusion_model." + k: v for k, v in tensors.items()}
    meta = {fp8.QUANT_METADATA: json.dumps({"format_version": "1.0", "layers": layers})}
    write_safetensors(work / "meta.safetensors", prefixed, meta)
    out.append((work / "meta.safetensors").read_bytes())
    return out + [smoothed]  # last: hostile_seeds damages its factors


def _sampler_seeds(work: Path) -> list[bytes]:
    import torch

    from qconvert.core.io import write_safetensors
    from qconvert.running import inputs

    prompt = inputs.synthetic_prompt(_lora_model().config, seed=0, length=6)
    files = {"prompt": {"prompt_embeds": prompt.embeds, "prompt_embeds_mask": prompt.mask,
                        "negative_prompt_embeds": prompt.neg_embeds, "negative_prompt_embeds_mask": prompt.neg_mask},
             "noise": {"noise": inputs.seeded_noise(0, 32, 32)},
             "ref": {"image_latents": torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))}}
    out = []
    for name, tensors in files.items():
        write_safetensors(work / f"{name}.safetensors", tensors)
        out.append((work / f"{name}.safetensors").read_bytes())
    return out


def _imatrix_seeds(work: Path) -> list[bytes]:
    import gguf
    import numpy as np

    from qconvert.running.calibrate import run_calibrate
    from qconvert.running.sample import SampleOptions

    calib = work / "calib.safetensors"
    run_calibrate(_runnable_model(), SampleOptions(height=32, width=32, steps=1, schedule="lightning"), [], 1, calib,
                  keep_rows=2, echo=lambda _: None)
    from safetensors.torch import load_file

    tensors = load_file(str(calib))
    writer = gguf.GGUFWriter(str(work / "imatrix.gguf"), arch="imatrix")
    for key in sorted(k for k in tensors if k.endswith(".in_sq_mean")):
        base = "model.diffusion_model." + key[: -len(".in_sq_mean")] + ".weight"
        writer.add_tensor(base + ".in_sum2", tensors[key].numpy())
        writer.add_tensor(base + ".counts", np.array([1.0], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [calib.read_bytes(), (work / "imatrix.gguf").read_bytes()]


def torch_bf16():
    import torch

    return torch.bfloat16
