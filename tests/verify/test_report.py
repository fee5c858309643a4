"""``qconvert verify``: figures against peers' conventions, the gate catching regressions and corruption."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from qconvert.core import tiny
from qconvert.core.checkpoint import open_checkpoint
from qconvert.formats.gguf import writer
from qconvert.formats.gguf.reader import check_header
from qconvert.running import metrics

from ..cli_helpers import assert_one_line_error, run

SMALL = dict(layers=2, heads=2, head_dim=32, text_dim=64)
FAST = ["--height", 32, "--width", 48, "--steps", 2]
SETTINGS = {"height": 32, "width": 48, "steps": 2, "cfg": 1.0, "schedule": "lightning",
            "prompts": ["synthetic:0", "synthetic:1"], "seeds": [0, 1], "decode": "off", "dtype": "float32",
            "runtime": "native"}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    model = tiny.make_tiny(root / "m", **SMALL)
    levels = ["BF16", "Q8_0", "Q2_K"]
    paths = {level: root / f"m-{level}.gguf" for level in levels}
    with open_checkpoint(model) as src:
        writer.write_gguf(src, writer.plan_files(src, levels, policy="uniform"), list(paths.values()), quiet=True)
    return model, paths


def verify(capsys, output, model, report, *extra):
    return run(["verify", output, "--reference", model, "--report", report, *FAST, *extra], capsys)


def test_report_ranks_levels_and_bf16_is_exact(tmp_path, capsys, outputs):
    model, paths = outputs
    figures = {}
    for level, path in paths.items():
        code, out, err = verify(capsys, path, model, tmp_path / level)
        assert code == 0, err
        report = json.loads((tmp_path / level / "report.json").read_text())
        assert report["schema_version"] == 3 and report["format"] == "gguf"
        assert (tmp_path / level / "report.md").read_text().startswith("# qconvert verify")
        figures[level] = report
    assert figures["BF16"]["weights"]["worst_rel_rmse"] == 0 and figures["BF16"]["latents"]["psnr_db"] is None
    assert figures["BF16"]["blocks"]["worst_rel_rmse"] == 0
    # every block, at the first and last of the 2 steps (first, middle and last coincide)
    assert [(r["step"], r["block"]) for r in figures["Q8_0"]["per_block"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert figures["Q8_0"]["blocks"]["worst_rel_rmse"] < figures["Q2_K"]["blocks"]["worst_rel_rmse"]
    assert figures["Q8_0"]["latents"]["psnr_db"] > figures["Q2_K"]["latents"]["psnr_db"]
    assert figures["Q8_0"]["weights"]["worst_rel_rmse"] < figures["Q2_K"]["weights"]["worst_rel_rmse"]


def test_gate_catches_a_level_swap(tmp_path, capsys, outputs):
    model, paths = outputs
    verify(capsys, paths["Q8_0"], model, tmp_path / "base")
    code, _, err = verify(capsys, paths["Q2_K"], model, tmp_path / "now", "--baseline", tmp_path / "base/report.json")
    assert_one_line_error(code, err, "gate: weights.worst_rel_rmse", "baseline", "worst layer")
    assert (tmp_path / "now/report.json").is_file()  # the failing report is kept for CI to show


def test_gate_catches_one_scrambled_block(tmp_path, capsys, outputs):
    model, paths = outputs
    verify(capsys, paths["Q8_0"], model, tmp_path / "base")
    bad = tmp_path / "bad.gguf"
    shutil.copy(paths["Q8_0"], bad)
    header = check_header(bad)
    victim = next(t for t in header.tensors if t.name == "transformer_blocks.1.img_mlp.net.2.weight")
    raw = bytearray(bad.read_bytes())
    start = header.data_start + victim.offset
    g = torch.Generator().manual_seed(0)
    # scramble the quantized values of every block, leaving the scales: a plausible-looking corruption
    for b in range(victim.nbytes // 34):
        block = start + 34 * b + 2
        raw[block:block + 32] = bytes(torch.randint(0, 256, (32,), generator=g, dtype=torch.uint8).tolist())
    bad.write_bytes(bytes(raw))
    code, _, err = verify(capsys, bad, model, tmp_path / "now", "--baseline", tmp_path / "base/report.json")
    assert_one_line_error(code, err, "gate:", "worst layer transformer_blocks.1.img_mlp.net.2.weight")
    report = json.loads((tmp_path / "now/report.json").read_text())
    assert report["blocks"]["worst_block"] == 1  # the block whose weights were scrambled adds the error


def test_max_minutes_writes_a_partial_report_that_is_never_gated(tmp_path, capsys, outputs):
    model, paths = outputs
    verify(capsys, paths["Q8_0"], model, tmp_path / "base")
    code, out, err = verify(capsys, paths["Q8_0"], model, tmp_path / "partial", "--max-minutes", 1e-9)
    assert code == 0, err
    report = json.loads((tmp_path / "partial/report.json").read_text())
    assert report["complete"] is False and report["stopped"].startswith("weights: 0 of")
    assert "Partial report" in (tmp_path / "partial/report.md").read_text()
    code, _, err = verify(capsys, paths["Q8_0"], model, tmp_path / "p2", "--max-minutes", 1e-9,
                          "--baseline", tmp_path / "base/report.json")
    assert_one_line_error(code, err, "the report is partial", "not gated")


def test_identical_rerun_passes_the_gate(tmp_path, capsys, outputs):
    model, paths = outputs
    verify(capsys, paths["Q8_0"], model, tmp_path / "base")
    code, _, err = verify(capsys, paths["Q8_0"], model, tmp_path / "again", "--baseline", tmp_path / "base/report.json")
    assert code == 0, err
    a, b = ((tmp_path / d / "report.json").read_text() for d in ("base", "again"))
    assert a == b  # deterministic


def test_baseline_with_other_settings_is_refused(tmp_path, capsys, outputs):
    model, paths = outputs
    verify(capsys, paths["Q8_0"], model, tmp_path / "base")
    code, _, err = run(["verify", paths["Q8_0"], "--reference", model, "--report", tmp_path / "now", "--height", 64,
                        "--width", 48, "--steps", 3, "--baseline", tmp_path / "base/report.json"], capsys)
    assert_one_line_error(code, err, "made with other settings", "height 32 there, 64 here", "steps 2 there, 3 here")
    assert not (tmp_path / "now").exists()


@pytest.mark.parametrize("damage, patterns", [
    (lambda p: p.write_text("[" * 5000), ["JSON nested too deeply"]),
    (lambda p: p.write_text('{"schema_version": 7}'), ["a verify report of schema 7", "rerun the baseline"]),
    (lambda p: p.write_text('{"settings": {}}'), ["not a qconvert verify report"]),
    (lambda p: p.write_text(json.dumps({"schema_version": 3, "settings": SETTINGS, "complete": False})),
     ["a partial report", "cannot be a baseline"]),
    (lambda p: p.write_text(json.dumps({"schema_version": 3, "settings": SETTINGS, "complete": True,
                                        "weights": {}, "blocks": {}, "latents": {"psnr_db": "high"}})),
     ["latents.psnr_db must be a number, not a string"]),
])
def test_hostile_baselines(tmp_path, capsys, outputs, damage, patterns):
    model, paths = outputs
    base = tmp_path / "base.json"
    damage(base)
    code, _, err = verify(capsys, paths["Q8_0"], model, tmp_path / "now", "--baseline", base)
    assert_one_line_error(code, err, *patterns)
    assert not (tmp_path / "now").exists()


def test_reference_of_another_config(tmp_path, capsys, outputs):
    _, paths = outputs
    other = tiny.make_tiny(tmp_path / "other", layers=2, heads=2, head_dim=32, text_dim=128)
    code, _, err = verify(capsys, paths["Q8_0"], other, tmp_path / "r")
    assert_one_line_error(code, err, "txt_in.weight", "not the same model and config")
    assert not (tmp_path / "r").exists()


def test_output_that_is_no_model(tmp_path, capsys, outputs):
    model, _ = outputs
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    code, _, err = verify(capsys, junk, model, tmp_path / "r")
    assert_one_line_error(code, err, "junk.gguf", "not a GGUF file")


def test_metrics():
    x = torch.randn(16, 12, 10)
    assert metrics.psnr(x, x) == math.inf and metrics.ssim(x, x) == pytest.approx(1.0)
    noisy = x + 0.1 * torch.randn_like(x)
    noisier = x + 0.5 * torch.randn_like(x)
    assert metrics.ssim(noisy, x) > metrics.ssim(noisier, x) and metrics.psnr(noisy, x) > metrics.psnr(noisier, x)
    mse = float(((noisy - x) ** 2).mean())
    span = float(x.max() - x.min())
    assert metrics.psnr(noisy, x) == pytest.approx(10 * math.log10(span ** 2 / mse))


def test_unpack_is_the_pipelines():
    diffusers = pytest.importorskip("diffusers")
    lat = torch.randn(1, 6, 64)  # 32x48 px
    want = diffusers.QwenImagePipeline._unpack_latents(lat, 32, 48, 8)[0, :, 0]
    assert torch.equal(metrics.unpack(lat, 32, 48), want)


def test_report_pictures_and_page(tmp_path, capsys, outputs):
    from PIL import Image

    from qconvert.running import pictures

    model, paths = outputs
    code, _, err = verify(capsys, paths["Q2_K"], model, tmp_path / "r")
    assert code == 0, err
    for name in ("reference.png", "output.png", "difference.png"):
        with Image.open(tmp_path / "r" / name) as im:  # a PNG other readers decode
            assert im.mode == "RGB" and im.size[0] >= 3 * 8
    page = (tmp_path / "r" / "index.html").read_text()
    assert '<img src="output.png"' in page and "<svg" in page and "Relative RMSE per layer" in page
    # ComfyUI's projection: zero latents show the bias
    zero = pictures.preview(torch.zeros(16, 2, 2))
    want = [round((b + 1) / 2 * 255) for b in pictures.LATENT_RGB_BIAS]
    assert zero[0, 0].tolist() == want


def test_block_errors_are_measured_early_middle_and_late():
    from qconvert.running.verify import measured_steps

    assert measured_steps(1) == [0] and measured_steps(2) == [0, 1]
    assert measured_steps(4) == [0, 2, 3] and measured_steps(50) == [0, 25, 49]


def test_dtype_and_device_are_settings(tmp_path, capsys, outputs):
    """bfloat16 compute runs the same code path CUDA takes; its report is gated only against a bfloat16 one."""
    model, paths = outputs
    code, _, err = verify(capsys, paths["Q8_0"], model, tmp_path / "bf16", "--dtype", "bfloat16")
    assert code == 0, err
    report = json.loads((tmp_path / "bf16" / "report.json").read_text())
    assert report["settings"]["dtype"] == "bfloat16" and report["latents"]["psnr_db"] > 20
    code, _, err = verify(capsys, paths["Q8_0"], model, tmp_path / "f32", "--baseline", tmp_path / "bf16/report.json")
    assert_one_line_error(code, err, "made with other settings", "dtype bfloat16 there, float32 here")
    if not torch.cuda.is_available():
        code, _, err = verify(capsys, paths["Q8_0"], model, tmp_path / "cuda", "--device", "cuda")
        assert_one_line_error(code, err, "cuda")
        assert not (tmp_path / "cuda").exists()
