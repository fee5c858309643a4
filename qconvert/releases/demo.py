"""``qconvert demo``: every conversion on a tiny model, with how to load each file."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from qconvert.converters.registry import DEMO_STEPS
from qconvert.core.errors import QConvertError
from qconvert.core.tiny import add_tiny_vae, make_tiny
from qconvert.formats.inspection import inspect_path
from qconvert.releases import release


def run_demo(out: Path, *, quiet: bool = False, echo: Callable[[str], None] = print,
             reports: bool = True) -> list[Path]:
    out = Path(out)
    written: list[Path] = []
    model = out / "tiny-qwen-image"
    make_tiny(model)
    written.append(model)
    try:
        add_tiny_vae(model)  # so the reports decode pixels, as they would with the real repo
    except QConvertError as exc:  # diffusers is optional: the reports then show latents only
        echo(f"no vae/ for the tiny model ({exc}); the verify reports show latents only")
    s = inspect_path(model)
    echo(f"tiny model      {model}  ({s['tensors']} tensors, {s['parameters']:,} parameters, diffusers layout)")
    echo("                loads in diffusers: QwenImageTransformer2DModel.from_pretrained("
         f"'{model}', subfolder='transformer')")
    for step in (*DEMO_STEPS, release.demo_step):
        written.extend(step(model, out, quiet, echo))
    if reports:
        written.extend(_verify_step(model, written, out, echo))
    echo(f"done: {len(written)} outputs under {out}/")
    return written


def _verify_step(model: Path, written: list[Path], out: Path, echo: Callable[[str], None]) -> list[Path]:
    """A verify report for every converted output, at verify's defaults (a few seconds each)."""
    from qconvert.core.checkpoint import open_checkpoint
    from qconvert.core.lora import with_loras
    from qconvert.running.defaults import VERIFY
    from qconvert.running.report import shown
    from qconvert.running.sample import SampleOptions
    from qconvert.running.verify import run_verify

    options = SampleOptions(**VERIFY)
    lora = next((p for p in written if p.name.endswith("lora.safetensors")), None)
    reports = []
    for path in written:
        baked = path.is_dir() and path != model and (path / "transformer").is_dir()
        if not (path.suffix in (".gguf", ".safetensors") and path != lora) and not baked:
            continue
        reference = with_loras(open_checkpoint(model), [lora]) if baked else open_checkpoint(model)
        folder = out / "reports" / path.name.replace(".", "-")
        with reference:
            r = run_verify(path, reference, options, folder, echo=lambda _: None)
        pixels = f"pixel PSNR {shown(r['pixels'], 'psnr_db', 1, ' dB')}, " if r["pixels"] else ""
        echo(f"verify          {folder}/index.html  ({pixels}latent PSNR {shown(r['latents'], 'psnr_db', 1, ' dB')}"
             f" over {r['latents']['samples']} samples, worst layer error {r['weights']['worst_rel_rmse']:.3g})")
        reports.append(folder)
    echo(f"                qconvert verify OUTPUT --reference {model} --report DIR  (add --baseline to gate)")
    return reports

