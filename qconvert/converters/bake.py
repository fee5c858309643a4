"""``qconvert bake-lora``: a LoRA view written out as a checkpoint in the source's dtype and layout.

A diffusers folder gives a diffusers folder (the source's shard names and
grouping, its config and model_index), a single file a single file; the
merge itself is ``lora.with_loras``'s, so this module only plans and writes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qconvert.converters.base import Converter, Result, Source, UsageError, option, silent
from qconvert.converters.catalog import help_text
from qconvert.core.checkpoint import INDEX_NAME, read_safetensors_header
from qconvert.core.errors import QConvertError
from qconvert.core.lora import LoraView
from qconvert.core.models import qwen_image as qi
from qconvert.formats.opener import detect

FORMAT = "safetensors (LoRA baked)"


@dataclass(frozen=True)
class OutputFile:
    """One safetensors file of the output: keys in the source's naming, in write order."""

    rel: str  # path inside the output folder ("" when the output is this one file)
    entries: tuple  # (key, dtype, shape)
    names: tuple  # the model tensor behind each entry
    nbytes: int


@dataclass
class BakePlan:
    output: Path
    layout: str
    files: list  # OutputFile
    copies: list  # (source path, rel): model_index.json, config.json
    texts: dict  # rel → text: the shard index, a config without a source file
    metadata: dict  # safetensors __metadata__ for every file
    tensors: list  # TensorPlan
    left_out: int = 0  # tensors of a whole ComfyUI checkpoint outside the transformer (VAE, text encoders)

    @property
    def total_bytes(self) -> int:
        return (sum(f.nbytes for f in self.files) + sum(src.stat().st_size for src, _ in self.copies)
                + sum(len(t.encode()) for t in self.texts.values()))


def default_output(view) -> Path:
    return Path(f"{view.name}.safetensors" if view.layout == "single-file" else view.name)


def bake_plan(view: LoraView, output=None, *, options: dict | None = None, dry_run: bool = False) -> BakePlan:
    """Exact files, names and bytes of the baked checkpoint.  Reads no tensor data.

    A dry run records zeros for the LoRA hashes (same length, so the sizes
    stay exact) instead of reading whole LoRA files.
    """
    from qconvert.core.io import safetensors_size
    from qconvert.core.pipeline import TensorPlan, provenance, provenance_json

    output = _output_path(view, output)
    options = {"device": str(view.device), **(options or {})}
    metadata = {"format": "pt",
                "qconvert": provenance_json(provenance(view, fmt=FORMAT, options=options, dry_run=dry_run))}
    tensors = view.tensors
    plans = [TensorPlan(n, m.key, m.shape, m.dtype, m.nbytes, _role(n)) for n, m in tensors.items()]
    # A folder keeps the source's shards (names and grouping); a single file stays one file.
    sub = "transformer/" if view.layout == "diffusers" else ""
    groups: dict[str, list[str]] = {}
    for n in tensors:
        groups.setdefault("" if view.layout == "single-file" else tensors[n].file.name, []).append(n)
    files = []
    for shard, names in sorted(groups.items()):
        names = sorted(names, key=lambda n: tensors[n].key)
        entries = tuple((tensors[n].key, tensors[n].dtype, tensors[n].shape) for n in names)
        files.append(OutputFile(sub + shard if shard else "", entries, tuple(names),
                                safetensors_size(entries, metadata)))
    if view.layout == "single-file":
        copies, texts = [], {}
        left_out = len(read_safetensors_header(view.path).tensors) - len(tensors)
    else:
        (copies, texts), left_out = _folder_files(view, sub, groups), 0
    return BakePlan(output, view.layout, files, copies, texts, metadata, plans, left_out)


def _role(name: str) -> str:
    return qi.describe(name).role.value if qi.is_known(name) else "extra"


def _folder_files(view, sub: str, groups: dict) -> tuple[list, dict]:
    """model_index.json and config.json as the source has them; a shard index if the source had one."""
    tensors = view.tensors
    shard_dir = next(iter(tensors.values())).file.parent
    copies, texts = [], {}
    if view.layout == "diffusers" and (view.path / "model_index.json").is_file():
        copies.append((view.path / "model_index.json", "model_index.json"))
    if (shard_dir / "config.json").is_file():
        copies.append((shard_dir / "config.json", sub + "config.json"))
    else:
        texts[sub + "config.json"] = json.dumps(view.config.to_json(), indent=2) + "\n"
    if (shard_dir / INDEX_NAME).is_file():
        weight_map = {tensors[n].key: shard for shard, names in groups.items() for n in names}
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        texts[sub + INDEX_NAME] = json.dumps(index, indent=2) + "\n"
    return copies, texts


def _output_path(view, output) -> Path:
    single = view.layout == "single-file"
    out = Path(output).expanduser() if output is not None else default_output(view)
    if single and out.is_dir():
        out = out / default_output(view).name  # e.g. -o ComfyUI/models/diffusion_models
    if single and out.suffix.lower() != ".safetensors":
        raise QConvertError(f"-o {out}: the source is one .safetensors file, so the output is too; "
                            "give a name ending in .safetensors")
    if not single and out.suffix.lower() == ".safetensors":
        raise QConvertError(f"-o {out}: the source is a {view.layout} folder, so the output is a folder "
                            "in the same layout; give a folder name")
    target = out.resolve()
    inputs = [*view.files(), *(lora.path for lora in view.loras)]
    for f in inputs:
        f = f.resolve()
        if f == target or target in f.parents:
            raise QConvertError(f"-o {out}: would overwrite the input {f}; choose another output")
    return out


def bake(view: LoraView, plan: BakePlan, *, quiet: bool = False) -> None:
    """Write the plan: one tensor in memory at a time, atomically (nothing left on failure)."""
    from qconvert.core.io import atomic_directory, atomic_output
    from qconvert.core.pipeline import progress

    data = sum(f.nbytes for f in plan.files)
    with progress(data, "bake-lora", quiet=quiet) as bar:
        if plan.layout == "single-file":
            with atomic_output(plan.output, expected_bytes=plan.total_bytes) as f:
                _write_file(f, view, plan.files[0], plan.metadata, bar)
            return
        with atomic_directory(plan.output, expected_bytes=plan.total_bytes) as tmp:
            for src, rel in plan.copies:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, tmp / rel)
            for rel, text in plan.texts.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_text(text)
            for out in plan.files:
                (tmp / out.rel).parent.mkdir(parents=True, exist_ok=True)
                with open(tmp / out.rel, "wb") as f:
                    _write_file(f, view, out, plan.metadata, bar)


def _write_file(f, view, out: OutputFile, metadata: dict, bar) -> None:
    from qconvert.core.io import SafetensorsWriter
    from qconvert.core.pipeline import check_finite, prefetched

    writer = SafetensorsWriter(f, out.entries, metadata)
    with contextlib.closing(prefetched(view.load, out.names)) as tensors:
        for (key, _, _), (name, tensor) in zip(out.entries, tensors):
            check_finite(name, tensor)
            writer.write(key, tensor)
            bar.update(tensor.numel() * tensor.element_size())
            del tensor
    writer.close()


def bake_report(view: LoraView, plan: BakePlan, *, dry_run: bool) -> dict:
    """The JSON result of ``bake-lora`` (also its --dry-run plan)."""
    from qconvert.core.pipeline import type_counts

    loras = [lora.summary() for lora in view.loras]
    if not dry_run:
        for summary, lora in zip(loras, view.loras):
            summary["sha256"] = lora.sha256()
    return {
        "command": "bake-lora",
        "dry_run": dry_run,
        "source": str(view.path),
        "layout": plan.layout,
        "output": str(plan.output),
        "loras": loras,
        "tensors": len(plan.tensors),
        "changed_tensors": len(view.patched_names()),
        "types": type_counts(plan.tensors),
        "files": [{"path": f.rel or plan.output.name, "bytes": f.nbytes} for f in plan.files]
                 + [{"path": rel, "bytes": src.stat().st_size} for src, rel in plan.copies]
                 + [{"path": rel, "bytes": len(text.encode())} for rel, text in plan.texts.items()],
        "total_bytes": plan.total_bytes,
        "left_out_tensors": plan.left_out,
        "plan": [p.to_json() for p in plan.tensors],
    }


def format_report(report: dict) -> str:
    lines = []
    for lora in report["loras"]:
        scales = ", ".join(f"{s:g}" for s in lora["alpha_over_rank"]) or "-"
        ranks = ", ".join(str(r) for r in lora["ranks"]) or "-"
        ignored = f", {lora['ignored_keys']} key(s) ignored" if lora["ignored_keys"] else ""
        lines.append(f"LoRA    {Path(lora['file']).name}  strength {lora['strength']:g}  rank {ranks}  "
                     f"alpha/rank {scales}  -> {len(lora['tensors'])} tensors{ignored}")
    verb = "would write" if report["dry_run"] else "wrote"
    lines.append(f"{verb}  {report['output']}  ({report['layout']} layout, {len(report['files'])} file(s), "
                 f"{report['tensors']} tensors of which {report['changed_tensors']} changed, "
                 f"{report['total_bytes'] / 1e9:.2f} GB)")
    if report["left_out_tensors"]:
        lines.append(f"note    the source also holds {report['left_out_tensors']} tensors outside the transformer "
                     "(VAE, text encoders); the output has the transformer only: load the others separately")
    lines.extend("        " + hint for hint in load_hints(Path(report["output"]), report["layout"]))
    return "\n".join(lines)


def load_hints(output: Path, layout: str) -> list[str]:
    if layout == "single-file":
        return [f"ComfyUI: copy {output.name} into models/diffusion_models/ and use 'Load Diffusion Model'",
                f"diffusers: QwenImageTransformer2DModel.from_single_file('{output}', torch_dtype=torch.bfloat16)"]
    sub = ", subfolder='transformer'" if layout == "diffusers" else ""
    return [f"diffusers: QwenImageTransformer2DModel.from_pretrained('{output}'{sub}, torch_dtype=torch.bfloat16), "
            "then QwenImagePipeline.from_pretrained('Qwen/Qwen-Image', transformer=transformer)",
            f"or convert it further: qconvert to-gguf {output} ..."]


# ------------------------------------------------------------- the command

SUMMARY = help_text("bake-lora", """\
W' = W + strength * alpha/rank * up @ down, in float32, rounded once.
A diffusers folder gives a diffusers folder, a single file a single file.
An SVDQuant file gives an SVDQuant file: each LoRA joins the low-rank branch, which is recompressed to the
file's rank (or --rank) by an exact SVD; no BF16 original is needed.

\b
qconvert bake-lora Qwen/Qwen-Image --lora Qwen-Image-Lightning-4steps-V1.0.safetensors -o qwen-image-lightning
qconvert bake-lora qwen_image_bf16.safetensors --lora style.safetensors:0.8 --lora lightning.safetensors \\
    -o qwen_image_style_lightning_bf16.safetensors
""")


@dataclass(frozen=True)
class BakeOptions:
    rank: int | None = option(None, kind=int, show_default=False,
                              help="SVDQuant inputs: the output's rank (default: the input's).")


def run(source: Source, o: BakeOptions, output=None, *, dry_run: bool = False, quiet: bool = False,
        echo: Callable[[str], None] = silent) -> Result:
    if not source.loras:
        raise UsageError("give at least one --lora FILE[:STRENGTH]")
    if detect(source.path) == "svdquant":
        return _into_svdquant(source, o, output, dry_run=dry_run, quiet=quiet)
    if o.rank is not None:
        raise UsageError("--rank applies to SVDQuant inputs only")
    with source.open() as view:
        plan = bake_plan(view, output, options={"ignore_unmatched": source.ignore_unmatched}, dry_run=dry_run)
        if not dry_run:
            bake(view, plan, quiet=quiet)
        report = bake_report(view, plan, dry_run=dry_run)
    return Result(report, format_report(report), [Path(report["output"])])


def _into_svdquant(source: Source, o: BakeOptions, output, *, dry_run: bool, quiet: bool) -> Result:
    from qconvert.converters.svdquant_lora import bake_into_file

    if output is None:
        raise UsageError("give -o for the SVDQuant file with the LoRAs baked in")
    if dry_run:
        raise UsageError("--dry-run is not offered for SVDQuant inputs (the output is the input's size)")
    report = bake_into_file(source.path, source.loras, output, rank=o.rank, ignore_unmatched=source.ignore_unmatched,
                            quiet=quiet)
    text = (f"wrote {report['output']}  ({report['format']} {report['precision']} rank {report['rank']}, "
            f"{report['bytes']:,} bytes)")
    return Result(report, text, [Path(report["output"])])


# ------------------------------------------------------------------ demo

def demo_step(model: Path, out: Path, quiet: bool, echo: Callable[[str], None]) -> list[Path]:
    """Bake a Lightning-like tiny LoRA into the tiny model."""
    from qconvert.core.tiny import make_tiny_lora

    lora = make_tiny_lora(out / "tiny-lightning-lora.safetensors", model, style="lightx2v", rank=8, alpha=1.0)
    target = out / "tiny-qwen-image-lightning"
    with Source(str(model), (f"{lora}:1.0",)).open() as view:
        plan = bake_plan(view, target)
        bake(view, plan, quiet=True)
        changed = len(view.patched_names())
    echo(f"tiny LoRA       {lora}  (lightx2v keys, rank 8, alpha 1: Lightning's alpha/rank 0.125)")
    echo(f"baked LoRA      {target}  ({changed} tensors changed; "
         f"qconvert bake-lora {model} --lora {lora}:1.0 -o {target})")
    echo("                " + load_hints(target, "diffusers")[0])
    echo("                or merge on the fly while converting: qconvert to-gguf ... --lora FILE:STRENGTH")
    return [lora, target]


CONVERTER = Converter("bake-lora", BakeOptions, run, SUMMARY)
