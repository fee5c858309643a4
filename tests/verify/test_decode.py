"""verify's pixels: the reference repo's VAE decodes as QwenImagePipeline does; pixel figures and their gate."""

from __future__ import annotations

import json

import pytest
import torch

from qconvert.core import tiny
from qconvert.core.checkpoint import open_checkpoint
from qconvert.formats.gguf import writer
from qconvert.running import decode, inputs, metrics, sampler
from qconvert.running.model import QwenImageTransformer
from qconvert.running.providers import DenseProvider
from tests.cli_helpers import assert_one_line_error, run

diffusers = pytest.importorskip("diffusers", reason="diffusers builds the VAE and is the oracle for decoding")
pytestmark = pytest.mark.oracle

SMALL = dict(layers=2, heads=2, head_dim=32, text_dim=64)
FAST = ["--height", 32, "--width", 48, "--steps", 2]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    model = tiny.make_tiny(root / "m", **SMALL)
    tiny.add_tiny_vae(model)
    levels = ["BF16", "Q8_0", "Q2_K"]
    paths = {level: root / f"m-{level}.gguf" for level in levels}
    with open_checkpoint(model) as src:
        writer.write_gguf(src, writer.plan_files(src, levels, policy="uniform"), list(paths.values()), quiet=True)
    return model, paths


def test_decoding_matches_the_pipeline(repo):
    """Our sampler + Decoder equal QwenImagePipeline(output_type="pt") with the same transformer and VAE."""
    model, _ = repo
    ref = diffusers.QwenImageTransformer2DModel.from_pretrained(model, subfolder="transformer",
                                                                torch_dtype=torch.float32).eval()
    vae = diffusers.AutoencoderKLQwenImage.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32).eval()
    pipe = diffusers.QwenImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True),
        vae=vae, text_encoder=None, tokenizer=None, transformer=ref)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    text, mask = torch.randn(1, 5, 64, generator=g), torch.ones(1, 5, dtype=torch.int64)
    noise = inputs.seeded_noise(2, 32, 48)
    with torch.no_grad():
        want = pipe(prompt_embeds=text, prompt_embeds_mask=mask, height=32, width=48, num_inference_steps=2,
                    latents=noise, output_type="pt").images[0]
        ckpt = open_checkpoint(model)
        latents = sampler.sample(QwenImageTransformer(ckpt.config, DenseProvider(ckpt)), noise, text, mask, steps=2,
                                 schedule="qwen", img_shapes=[(1, 2, 3)])
    got = decode.Decoder(model / "vae").pixels(metrics.unpack(latents, 32, 48))
    assert got.shape == want.shape == (3, 32, 48)
    assert (got - want).abs().max() <= 1e-4


def report(tmp_path, capsys, output, model, name, *extra):
    code, out, err = run(["verify", output, "--reference", model, "--report", tmp_path / name, *FAST, *extra], capsys)
    assert code == 0, err
    return json.loads((tmp_path / name / "report.json").read_text()), out


def test_verify_reports_pixels_and_ranks_levels(tmp_path, capsys, repo):
    model, paths = repo
    bf16, out = report(tmp_path, capsys, paths["BF16"], model, "bf16")
    assert "decoded by" in out and "pixels: PSNR" in out and bf16["settings"]["decode"] == "vae"
    assert bf16["pixels"]["psnr_db"] is None and bf16["pixels"]["ssim"] == pytest.approx(1.0)  # identical
    assert bf16["pixels"]["lpips"] is None and bf16["pixels"]["lpips_skipped"]  # said why, never silent
    q8, _ = report(tmp_path, capsys, paths["Q8_0"], model, "q8")
    q2, _ = report(tmp_path, capsys, paths["Q2_K"], model, "q2")
    assert q8["pixels"]["psnr_db"] > q2["pixels"]["psnr_db"]
    for name in ("reference-pixels.png", "output-pixels.png", "pixel-difference.png"):
        assert (tmp_path / "q8" / name).read_bytes().startswith(b"\x89PNG")
    assert "pixel PSNR" in (tmp_path / "q8" / "report.md").read_text()
    assert "reference-pixels.png" in (tmp_path / "q8" / "index.html").read_text()


def test_pixels_skipped_is_said_and_gated_as_another_setting(tmp_path, capsys, repo):
    model, paths = repo
    off, out = report(tmp_path, capsys, paths["Q8_0"], model, "off", "--no-decode")
    assert off["pixels"] is None and off["pixels_skipped"] == "--no-decode given" and "no pixel figures" in out
    assert "not decoded: --no-decode given" in (tmp_path / "off" / "index.html").read_text()
    report(tmp_path, capsys, paths["Q8_0"], model, "on")
    code, _, err = run(["verify", paths["Q8_0"], "--reference", model, "--report", tmp_path / "x", *FAST,
                        "--baseline", tmp_path / "off" / "report.json"], capsys)
    assert_one_line_error(code, err, "made with other settings", "decode off there, vae here")


def test_gate_on_pixels(tmp_path, capsys, repo):
    model, paths = repo
    report(tmp_path, capsys, paths["Q8_0"], model, "base")
    base = json.loads((tmp_path / "base" / "report.json").read_text())
    base["pixels"]["psnr_db"] += 100  # a baseline whose pixels were far better
    (tmp_path / "base" / "report.json").write_text(json.dumps(base))
    code, _, err = run(["verify", paths["Q8_0"], "--reference", model, "--report", tmp_path / "now", *FAST,
                        "--baseline", tmp_path / "base" / "report.json"], capsys)
    assert_one_line_error(code, err, "gate: pixels.psnr_db")


def test_no_vae_is_said(tmp_path, capsys):
    model = tiny.make_tiny(tmp_path / "m", **SMALL)
    rep, out = report(tmp_path, capsys, model, model, "r")
    assert rep["pixels"] is None and "no vae/ folder" in rep["pixels_skipped"] and "--vae DIR" in out


@pytest.mark.parametrize("damage, patterns", [
    (lambda vae: (vae / "config.json").write_text(json.dumps({**tiny.TINY_VAE, "z_dim": 4})), ["z_dim"]),
    (lambda vae: (vae / "config.json").write_text(json.dumps({**tiny.TINY_VAE, "base_dim": 10 ** 9})),
     ["base_dim"]),
    (lambda vae: (vae / "config.json").write_text(json.dumps({**tiny.TINY_VAE, "_class_name": "AutoencoderKL"})),
     ["not the Qwen-Image VAE"]),
    (lambda vae: (vae / "config.json").write_text(json.dumps({**tiny.TINY_VAE, "num_res_blocks": 2})),
     ["does not fit its config.json"]),
    (lambda vae: ((vae / "diffusion_pytorch_model.safetensors").unlink(),
                  (vae / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")), ["refusing a pickle"]),
    (lambda vae: (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{}"),
     ["diffusion_pytorch_model.safetensors"]),
])
def test_hostile_vae_folders(tmp_path, capsys, damage, patterns):
    model = tiny.make_tiny(tmp_path / "m", **SMALL)
    damage(tiny.add_tiny_vae(model))
    code, out, err = run(["verify", model, "--reference", model, "--report", tmp_path / "r", *FAST], capsys)
    assert_one_line_error(code, err, *patterns)
    assert not (tmp_path / "r").exists()
    if "does not fit" not in patterns[0]:  # caught before any measuring
        assert "verify:" not in out
