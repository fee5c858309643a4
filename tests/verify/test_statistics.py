"""verify over prompts x seeds: the batch is the samples run alone, intervals are scipy's bootstrap."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qconvert.core import tiny
from qconvert.core.checkpoint import open_checkpoint
from qconvert.core.io import write_safetensors
from qconvert.formats.gguf import writer
from qconvert.running import inputs, stats

from ..cli_helpers import assert_one_line_error, run

FAST = ["--height", 32, "--width", 48, "--steps", 2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    model = tiny.make_tiny(root / "m", layers=2, heads=2, head_dim=32, text_dim=64)
    path = root / "m-Q4_K_M.gguf"
    with open_checkpoint(model) as src:
        writer.write_gguf(src, writer.plan_files(src, ["Q4_K_M"], policy="uniform"), [path], quiet=True)
        config = src.config
    prompts = []
    for i, length in enumerate((5, 11)):  # two lengths: the batch pads the shorter and masks the padding
        p = inputs.synthetic_prompt(config, 100 + i, length=length)
        f = root / f"prompt{i}.safetensors"
        write_safetensors(f, {"prompt_embeds": p.embeds, "prompt_embeds_mask": p.mask,
                              "negative_prompt_embeds": p.neg_embeds, "negative_prompt_embeds_mask": p.neg_mask})
        prompts.append(f)
    return model, path, prompts


def verify(capsys, setup, report, *extra):
    model, path, _ = setup
    code, out, err = run(["verify", path, "--reference", model, "--report", report, *FAST, *extra], capsys)
    return code, err, (json.loads((report / "report.json").read_text()) if code == 0 else None)


@pytest.mark.parametrize("cfg", ["1", "3"])
def test_each_sample_of_the_batch_is_that_sample_run_alone(tmp_path, capsys, setup, cfg):
    _, _, (short, long) = setup
    code, err, both = verify(capsys, setup, tmp_path / "both", "--embeds", short, "--embeds", long, "--seeds", 2,
                             "--cfg", cfg)
    assert code == 0, err
    assert [(s["prompt"].split("#")[0], s["seed"]) for s in both["samples"]] == [
        ("prompt0.safetensors", 0), ("prompt0.safetensors", 1), ("prompt1.safetensors", 0),
        ("prompt1.safetensors", 1)]
    for index, (prompt, seed) in enumerate([(short, 1), (long, 0)], start=1):
        code, err, alone = verify(capsys, setup, tmp_path / f"alone{index}", "--embeds", prompt, "--seed", seed,
                                  "--seeds", 1, "--cfg", cfg)
        assert code == 0, err
        got = both["samples"][index if index == 1 else 2]["latents"]
        want = alone["samples"][0]["latents"]
        assert got["psnr_db"] == pytest.approx(want["psnr_db"], abs=1e-3)
        assert got["rel_rmse"] == pytest.approx(want["rel_rmse"], rel=1e-4)


def test_report_gives_means_with_intervals_and_the_samples(tmp_path, capsys, setup):
    code, err, r = verify(capsys, setup, tmp_path / "r", "--synthetic", 3, "--seeds", 2)
    assert code == 0, err
    assert r["settings"]["prompts"] == ["synthetic:0", "synthetic:1", "synthetic:2"]
    assert r["settings"]["seeds"] == [0, 1] and len(r["samples"]) == 6 and r["latents"]["samples"] == 6
    per_sample = [s["latents"]["psnr_db"] for s in r["samples"]]
    assert r["latents"]["psnr_db"] == pytest.approx(sum(per_sample) / 6)
    low, high = r["latents"]["interval"]["psnr_db"]
    assert min(per_sample) <= low < r["latents"]["psnr_db"] < high <= max(per_sample)
    assert r["statistics"]["resamples"] == stats.RESAMPLES
    text = (tmp_path / "r" / "report.md").read_text()
    assert "(95%: " in text and "## Samples" in text and "synthetic:2 | 1 |" in text


def test_synthetic_prompts_are_held_out_from_calibration(setup):
    model, _, _ = setup
    config = open_checkpoint(model).config
    calibration = [inputs.synthetic_prompt(config, i).embeds for i in range(64)]
    held_out = inputs.held_out_prompt(config, 0).embeds
    assert not any(torch.equal(held_out, c) for c in calibration)


def test_a_baseline_over_other_seeds_or_prompts_is_refused(tmp_path, capsys, setup):
    code, err, _ = verify(capsys, setup, tmp_path / "base")
    assert code == 0, err
    base = tmp_path / "base" / "report.json"
    code, err, _ = verify(capsys, setup, tmp_path / "now", "--seeds", 3, "--baseline", base)
    assert_one_line_error(code, err, "made with other settings", "seeds [0, 1] there, [0, 1, 2] here")
    code, err, _ = verify(capsys, setup, tmp_path / "now", "--synthetic", 1, "--baseline", base)
    assert_one_line_error(code, err, "made with other settings", "prompts")
    assert not (tmp_path / "now").exists()


@pytest.mark.parametrize("args, patterns", [
    (["--seeds", 0], ["--seeds 0", "1 or more"]),
    (["--synthetic", 0], ["--synthetic 0 and no --embeds", "at least one prompt"]),
    (["--synthetic", 100, "--seeds", 20], ["2000 samples", "at most 1024"]),
])
def test_bad_sample_counts(tmp_path, capsys, setup, args, patterns):
    code, err, _ = verify(capsys, setup, tmp_path / "r", *args)
    assert_one_line_error(code, err, *patterns)
    assert code == 1 and not (tmp_path / "r").exists()


def test_bootstrap_interval_is_scipys():
    scipy_stats = pytest.importorskip("scipy.stats")
    values = torch.Generator().manual_seed(3)
    data = (30 + 2 * torch.randn(40, generator=values)).tolist()
    ours = stats.summary(data)
    theirs = scipy_stats.bootstrap((data,), lambda x, axis: x.mean(axis=axis), method="percentile",
                                   n_resamples=20000, confidence_level=0.95, random_state=1).confidence_interval
    width = theirs.high - theirs.low
    assert ours["low"] == pytest.approx(theirs.low, abs=0.05 * width)
    assert ours["high"] == pytest.approx(theirs.high, abs=0.05 * width)
    assert stats.summary(data) == ours  # seeded: the same every run


def test_intervals_with_exact_samples_and_paired_gaps():
    exact = stats.summary([math.inf, math.inf])
    assert exact["mean"] == exact["low"] == exact["high"] == math.inf
    mixed = stats.summary([math.inf, 40.0, 41.0])
    assert mixed["mean"] == math.inf and mixed["low"] == pytest.approx(40.0, abs=1.0)
    # a consistent 0.3 dB gap is certain although each figure alone spans 6 dB
    a = [30.0, 33.0, 36.0, 31.0, 35.0, 32.0]
    gap = stats.paired_gap(a, [x - 0.3 for x in a])
    assert gap["low"] == pytest.approx(0.3) and gap["high"] == pytest.approx(0.3)
    assert stats.paired_gap([math.inf], [math.inf])["mean"] == 0.0
    with pytest.raises(ValueError):
        stats.paired_gap([1.0], [1.0, 2.0])


def test_a_prompt_given_twice_is_refused(tmp_path, capsys, setup):
    _, _, (short, _) = setup
    code, err, _ = verify(capsys, setup, tmp_path / "r", "--embeds", short, "--embeds", short)
    assert_one_line_error(code, err, "given twice", "each prompt once")
    assert not (tmp_path / "r").exists()
