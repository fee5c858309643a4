"""Edit models are measured as they are run: beside a reference image (verify, calibrate, the block measure).

The sampler's Edit path itself is checked against diffusers' Edit pipelines in ``test_sampler.py``; these
tests check that every measurement takes that path for an Edit model, and only for one.
"""

from __future__ import annotations

import json

import pytest
import torch

from qconvert.core import tiny
from qconvert.core.checkpoint import open_checkpoint
from qconvert.running import inputs, sampler
from qconvert.running.model import QwenImageTransformer
from qconvert.running.providers import DenseProvider
from qconvert.running.sample import SampleOptions
from tests.cli_helpers import assert_one_line_error, run

SMALL = dict(layers=2, heads=2, head_dim=32, text_dim=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    return {v: tiny.make_tiny(root / v, variant=v, **SMALL) for v in ("qwen-image", "edit", "edit-2511")}


def test_an_edit_model_says_so(models, tmp_path, capsys):
    """Edit-2511 by its config; Edit and Edit-2509 (Qwen-Image's config) by their pipeline class only."""
    found = {v: (open_checkpoint(p).edits, open_checkpoint(p).variant) for v, p in models.items()}
    assert found == {"qwen-image": (False, "qwen-image"), "edit": (True, "qwen-image"),
                     "edit-2511": (True, "qwen-image-edit-2511")}
    for variant, edits in (("edit", True), ("qwen-image", False)):
        code, out, err = run(["inspect", models[variant]], capsys)
        assert code == 0 and ("QwenImageEditPlusPipeline: an Edit model" in out) is edits, err
    bad = tiny.make_tiny(tmp_path / "bad", **SMALL)
    (bad / "model_index.json").write_text(json.dumps({"_class_name": ["QwenImageEditPlusPipeline"]}))
    code, _, err = run(["inspect", bad], capsys)
    assert_one_line_error(code, err, "model_index.json: _class_name must be a string")
    (bad / "model_index.json").write_text("[1, 2]")
    code, _, err = run(["inspect", bad], capsys)
    assert_one_line_error(code, err, "model_index.json: not a JSON object")


def test_synthetic_references_are_seeded_images_not_noise():
    a, b = inputs.synthetic_reference(0, 64, 96), inputs.synthetic_reference(1, 64, 96)
    assert a.shape == (1, inputs.tokens(64, 96), inputs.PACKED)
    assert torch.equal(a, inputs.synthetic_reference(0, 64, 96))
    assert not torch.equal(a, b) and not torch.allclose(a, inputs.seeded_noise(0, 64, 96))
    assert abs(float(a.std()) - 1) < 0.05


def test_verify_batch_runs_each_sample_beside_its_own_reference(models):
    """The batched run with references ends where the sampler (diffusers-checked) ends for each sample alone."""
    from qconvert.running.verify import load_batch, sample_latents

    source = open_checkpoint(models["edit-2511"])
    options = SampleOptions(height=64, width=64, steps=2, cfg=1.0, schedule="lightning", seed=5, synthetic=2,
                            seeds=2)
    batch = load_batch(options, source.config, references=True)
    assert batch.references.shape == (4, 16, 64) and batch.shapes(64, 64) == [(1, 4, 4), (1, 4, 4)]
    assert torch.equal(batch.references[0], batch.references[1])       # a prompt's reference, for every seed
    assert not torch.equal(batch.references[0], batch.references[2])   # another prompt, another image
    got = sample_latents(source, source, options, batch)
    model = QwenImageTransformer(source.config, DenseProvider(source))
    for i in range(len(batch)):
        prompt = inputs.held_out_prompt(source.config, i // 2)
        with torch.no_grad():
            want = sampler.sample(model, batch.noise[i:i + 1], prompt.embeds, prompt.mask, steps=2,
                                  schedule="lightning", img_shapes=[(1, 4, 4), (1, 4, 4)],
                                  image_latents=batch.references[i:i + 1])
        assert (got[i:i + 1] - want).abs().max() <= 1e-4
    plain = sample_latents(source, source, options, load_batch(options, source.config))
    assert (plain - got).abs().max() > 1e-2   # the reference changes what is measured


def test_verify_and_calibrate_say_they_ran_beside_references(models, tmp_path, capsys):
    for variant, edits in (("edit", True), ("qwen-image", False)):
        model = models[variant]
        out = tmp_path / f"{variant}.safetensors"
        code, _, err = run(["to-comfy", model, "--format", "nvfp4", "-o", out, "-q"], capsys)
        assert code == 0, err
        code, stdout, err = run(["verify", out, "--reference", model, "--report", tmp_path / f"r-{variant}",
                                 "--synthetic", "1", "--seeds", "1", "--steps", "2", "--height", "64", "--width",
                                 "64"], capsys)
        assert code == 0, err
        settings = json.loads((tmp_path / f"r-{variant}" / "report.json").read_text())["settings"]
        assert ("references" in settings) is edits and ("synthetic reference image" in stdout) is edits
        stats = tmp_path / f"{variant}-calib.safetensors"
        code, stdout, err = run(["calibrate", model, "--synthetic", "1", "--steps", "2", "--height", "64",
                                 "--width", "64", "-o", stats], capsys)
        assert code == 0, err
        assert ("synthetic reference image" in stdout) is edits


def test_the_block_measure_runs_an_edit_model_beside_a_reference(models, monkeypatch):
    from qconvert.running.sensitivity import block_sensitivity, comfy_candidates

    source = open_checkpoint(models["edit"])
    layer = "transformer_blocks.0.img_mlp.net.0.proj"
    only = comfy_candidates("dequantized")
    only = type(only)(("nvfp4",), only.fitting, only.as_run)
    lines = []
    beside = block_sensitivity(source, [layer], size=64, candidates=only, echo=lines.append)
    assert "synthetic reference image" in lines[0]
    monkeypatch.setattr(inputs, "takes_references", lambda source: False)
    alone = block_sensitivity(source, [layer], size=64, candidates=only, echo=lines.append)
    assert beside[layer]["nvfp4"] > 0 and alone[layer]["nvfp4"] > 0
    assert abs(beside[layer]["nvfp4"] - alone[layer]["nvfp4"]) > 1e-3 * alone[layer]["nvfp4"]
