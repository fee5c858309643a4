"""``qconvert sample``: inputs read as hostile files, seeded noise as diffusers makes it, one-line errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qconvert.core import tiny
from qconvert.core.checkpoint import open_checkpoint
from qconvert.core.io import write_safetensors
from qconvert.running import inputs, sampler
from qconvert.running.model import QwenImageTransformer
from qconvert.running.providers import DenseProvider

from ..cli_helpers import assert_one_line_error, run


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.make_tiny(tmp_path_factory.mktemp("sample") / "m", layers=2, heads=2, head_dim=32, text_dim=64)


@pytest.fixture(scope="module")
def embeds(tmp_path_factory, model):
    prompt = inputs.synthetic_prompt(open_checkpoint(model).config, seed=5, length=9)
    path = tmp_path_factory.mktemp("embeds") / "prompt.safetensors"
    write_safetensors(path, {"prompt_embeds": prompt.embeds, "prompt_embeds_mask": prompt.mask,
                             "negative_prompt_embeds": prompt.neg_embeds,
                             "negative_prompt_embeds_mask": prompt.neg_mask})
    return path


def test_sample_writes_what_the_sampler_computes(tmp_path, capsys, model, embeds):
    out = tmp_path / "lat.safetensors"
    code, stdout, err = run(["sample", model, "--embeds", embeds, "--height", 32, "--width", 48, "--steps", 3,
                             "--cfg", 3, "--seed", 7, "-o", out], capsys)
    assert code == 0, err
    assert "3 steps x 2 model run(s) of 2 blocks" in stdout
    ckpt = open_checkpoint(model)
    prompt = inputs.read_prompt(embeds, ckpt.config)
    with torch.no_grad():
        want = sampler.sample(QwenImageTransformer(ckpt.config, DenseProvider(ckpt)), inputs.seeded_noise(7, 32, 48),
                              prompt.embeds, prompt.mask, steps=3, cfg=3, neg_text=prompt.neg_embeds,
                              neg_mask=prompt.neg_mask, img_shapes=[(1, 2, 3)])
    assert torch.equal(load_file(str(out))["latents"], want)
    again = tmp_path / "again.safetensors"
    run(["sample", model, "--embeds", embeds, "--height", 32, "--width", 48, "--steps", 3, "--cfg", 3,
         "--seed", 7, "-o", again], capsys)
    assert again.read_bytes() == out.read_bytes()  # deterministic, provenance included


def test_seeded_noise_is_the_pipelines(model):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.QwenImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                                       text_encoder=None, tokenizer=None, transformer=None)
    want = pipe.prepare_latents(1, 16, 64, 96, torch.float32, "cpu", torch.Generator().manual_seed(11))
    assert torch.equal(inputs.seeded_noise(11, 64, 96), want)


def test_reference_latents_are_packed_as_the_pipeline_packs(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    lat = torch.randn(1, 16, 1, 6, 8)
    path = tmp_path / "ref.safetensors"
    write_safetensors(path, {"image_latents": lat})
    packed, shape = inputs.read_image_latents(path)
    assert shape == (1, 3, 4)
    want = diffusers.QwenImagePipeline._pack_latents(lat[:, :, 0], 1, 16, 6, 8)
    assert torch.equal(packed, want)


def test_a_missing_mask_means_every_token_counts(tmp_path, model):
    """diffusers' encode_prompt returns mask None when the prompt fills every position."""
    path = tmp_path / "p.safetensors"
    write_safetensors(path, {"prompt_embeds": torch.randn(1, 4, 64)})
    prompt = inputs.read_prompt(path, open_checkpoint(model).config)
    assert prompt.mask.tolist() == [[1, 1, 1, 1]] and prompt.neg_embeds is None


def test_edit_sampling_runs_with_a_reference(tmp_path, capsys, model):
    ref = tmp_path / "ref.safetensors"
    write_safetensors(ref, {"image_latents": torch.randn(1, 16, 4, 4)})
    out = tmp_path / "edit.safetensors"
    code, _, err = run(["sample", model, "--synthetic-embeds", "--height", 32, "--width", 32, "--steps", 2,
                        "--image-latents", ref, "-o", out, "--quiet"], capsys)
    assert code == 0, err
    assert load_file(str(out))["latents"].shape == (1, 4, 64)


@pytest.mark.parametrize("make, args, pattern", [
    (lambda p: write_safetensors(p, {"prompt_embeds": torch.zeros(1, 4, 63), "prompt_embeds_mask":
                                     torch.ones(1, 4, dtype=torch.int64)}),
     ["--embeds"], "prompt_embeds has shape [1, 4, 63]; this model takes [1, L, 64]"),
    (lambda p: write_safetensors(p, {"prompt_embeds": torch.zeros(1, 4, 64), "prompt_embeds_mask":
                                     torch.ones(1, 5, dtype=torch.int64)}),
     ["--embeds"], "prompt_embeds_mask has shape [1, 5], not [1, 4] like prompt_embeds"),
    (lambda p: write_safetensors(p, {"prompt_embeds": torch.full((1, 4, 64), float("nan"))}),
     ["--embeds"], "prompt_embeds must be finite floats"),
    (lambda p: write_safetensors(p, {"embeds": torch.zeros(1, 4, 64)}), ["--embeds"], "no tensor prompt_embeds"),
    (lambda p: write_safetensors(p, {"noise": torch.zeros(1, 5, 64)}),
     ["--synthetic-embeds", "--noise"], "noise has shape [1, 5, 64]; 32x32 needs [1, 4, 64]"),
    (lambda p: write_safetensors(p, {"image_latents": torch.zeros(1, 4, 4, 4)}),
     ["--synthetic-embeds", "--image-latents"], "image_latents has shape [1, 4, 4, 4]"),
    (lambda p: p.write_bytes(b"\x80\x04" + b"junk" * 8), ["--embeds"], "pickle"),
])
def test_bad_inputs_are_one_line(tmp_path, capsys, model, make, args, pattern):
    bad = tmp_path / "bad.safetensors"
    make(bad)
    out = tmp_path / "out.safetensors"
    code, _, err = run(["sample", model, "--height", 32, "--width", 32, "--steps", 2, *args, bad, "-o", out], capsys)
    assert_one_line_error(code, err, pattern)
    assert not out.exists()


def test_size_must_be_a_multiple_of_16(tmp_path, capsys, model):
    code, _, err = run(["sample", model, "--synthetic-embeds", "--height", 40, "--width", 32,
                        "-o", tmp_path / "o.safetensors"], capsys)
    assert_one_line_error(code, err, "--height 40 --width 32: both must be positive multiples of 16")


def test_layered_is_refused_clearly(tmp_path, capsys):
    layered = tiny.make_tiny(tmp_path / "l", layers=1, heads=2, head_dim=32, text_dim=64, variant="layered")
    code, _, err = run(["sample", layered, "--synthetic-embeds", "--height", 32, "--width", 32,
                        "-o", tmp_path / "o.safetensors"], capsys)
    assert_one_line_error(code, err, "Qwen-Image-Layered")


def test_a_model_whose_rope_axes_are_odd_cannot_run(tmp_path, capsys):
    odd = tiny.make_tiny(tmp_path / "odd", layers=1, heads=2, head_dim=16, text_dim=64)  # axes (2, 7, 7)
    code, _, err = run(["sample", odd, "--synthetic-embeds", "--height", 32, "--width", 32, "--steps", 2,
                        "-o", tmp_path / "o.safetensors"], capsys)
    assert_one_line_error(code, err, "axes_dims_rope [2, 7, 7]: every axis must be even")


def test_weight_cache_gives_the_same_bytes_and_reads_less(tmp_path, capsys, model, embeds):
    """--cache-gb keeps converted weights between steps: the same latents, fewer reads; 0 keeps none."""
    outs = []
    for cache in ("0", "1"):
        out = tmp_path / f"lat{cache}.safetensors"
        code, _, err = run(["sample", model, "--embeds", embeds, "--height", 32, "--width", 32, "--steps", 3,
                            "--cfg", 1, "--cache-gb", cache, "-o", out], capsys)
        assert code == 0, err
        outs.append(load_file(out)["latents"])
    assert torch.equal(*outs)

    class Counting:
        def __init__(self, ckpt):
            self.ckpt, self.loads = ckpt, 0

        def load(self, name):
            self.loads += 1
            return self.ckpt.load(name)

    ckpt = open_checkpoint(model)
    reads = {}
    for budget in (0, 1 << 30, 300_000):
        source = Counting(ckpt)
        provider = DenseProvider(source, cache_bytes=budget)
        for _ in range(3):  # three steps
            QwenImageTransformer(ckpt.config, provider)(*_inputs(ckpt.config))
        reads[budget] = source.loads
        assert provider.cached_bytes <= budget
    assert reads[1 << 30] * 3 == reads[0]  # everything kept: read once, not at every step
    assert reads[1 << 30] < reads[300_000] < reads[0]  # a small budget keeps the first tensors only


def _inputs(config):
    prompt = inputs.synthetic_prompt(config, seed=0, length=4, negative=False)
    return inputs.seeded_noise(0, 32, 32), prompt.embeds, prompt.mask, torch.tensor([0.5]), [(1, 2, 2)]


def test_cache_gb_must_be_sane(tmp_path, capsys, model):
    code, _, err = run(["sample", model, "--synthetic-embeds", "--cache-gb", "-1", "-o", tmp_path / "x.safetensors"],
                       capsys)
    assert_one_line_error(code, err, "--cache-gb -1")
