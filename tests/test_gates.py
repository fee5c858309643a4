"""Gated releases: gates judged on interval bounds, recorded, and enforced by recipe run and publish."""

from __future__ import annotations

import json
import math

import pytest

from qconvert.core import tiny
from qconvert.releases import gates
from tests.cli_helpers import assert_one_line_error, run

VERIFY = 'height = 32\nwidth = 32\nsteps = 2\ndecode = false\n'


def recipe(path, model, outputs: str, verify: str = VERIFY):
    path.write_text(f'[recipe]\nname = "gated"\nsource = "{model}"\n\n[card]\nbase_model = "Qwen/Qwen-Image"\n\n'
                    f'[verify]\n{verify}\n{outputs}')
    return path


GATED = '''
[[output]]
converter = "to-gguf"
levels = ["Q8_0"]
file = "t-{level}.gguf"

[[output]]
name = "nvfp4"
converter = "to-comfy"
format = "nvfp4"
file = "t-nvfp4.safetensors"
gate = [{ figure = "latents.psnr_db", min = 10 },
        { figure = "weights.worst_rel_rmse", max = 0.5 },
        { figure = "latents.psnr_db", max_gap = GAP, to = "Q8_0" }]
'''


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.make_tiny(tmp_path_factory.mktemp("gates") / "m", layers=2)


def test_a_failed_gate_fails_the_run_and_blocks_publish(model, tmp_path, capsys):
    path = recipe(tmp_path / "r.toml", model, GATED.replace("GAP", "0.01"))
    out = tmp_path / "rel"
    code, _, err = run(["recipe", "run", path, "--out", out, "-q"], capsys)
    assert_one_line_error(code, err, "1 gate(s) failed", "nvfp4: latents.psnr_db loses at most 0.01 to Q8_0",
                          "interval reaches")
    m = json.loads((out / "manifest.json").read_text())
    verdicts = m["outputs"]["nvfp4"]["gates"]
    assert [v["passed"] for v in verdicts] == [True, True, False]
    low, high = verdicts[0]["interval"]
    assert low <= verdicts[0]["mean"] <= high and low >= 10
    gap = verdicts[2]
    # the paired gap is Q8_0's per-sample PSNR minus nvfp4's, averaged: recompute it from the two reports
    reports = {n: json.loads((out / "reports" / n / "report.json").read_text()) for n in ("Q8_0", "nvfp4")}
    per = [a["latents"]["psnr_db"] - b["latents"]["psnr_db"]
           for a, b in zip(reports["Q8_0"]["samples"], reports["nvfp4"]["samples"])]
    assert gap["mean"] == pytest.approx(sum(per) / len(per)) and gap["interval"][0] > 0.01
    assert m["outputs"]["nvfp4"]["verify"]["intervals"]["latents.psnr_db"] == reports["nvfp4"]["latents"][
        "interval"]["psnr_db"]

    code, _, err = run(["publish", out, "--repo", "a/b", "--dry-run"], capsys)
    assert_one_line_error(code, err, "gate failed", "nvfp4", "--force")
    code, card, err = run(["publish", out, "--repo", "a/b", "--dry-run", "--force"], capsys)
    assert code == 0, err
    assert "**Published with `--force`**" in card and "## Gates" in card and "**failed**" in card
    assert " dB (" in card  # figures with their intervals


def test_passing_gates_publish_without_force(model, tmp_path, capsys):
    path = recipe(tmp_path / "r.toml", model, GATED.replace("GAP", "40"))
    out = tmp_path / "rel"
    code, _, err = run(["recipe", "run", path, "--out", out, "-q"], capsys)
    assert code == 0, err
    code, card, err = run(["publish", out, "--repo", "a/b", "--dry-run"], capsys)
    assert code == 0, err
    assert "--force" not in card and "| passed |" in card


def test_an_output_without_a_report_is_not_published_unless_forced(model, tmp_path, capsys):
    outputs = GATED.split("[[output]]\nname")[0] + '\n[[output]]\nname = "fp8"\nconverter = "to-fp8"\n' \
        'file = "t-fp8.safetensors"\nverify = { enabled = false }\n'
    out = tmp_path / "rel"
    code, _, err = run(["recipe", "run", recipe(tmp_path / "r.toml", model, outputs), "--out", out, "-q"], capsys)
    assert code == 0, err
    code, _, err = run(["publish", out, "--repo", "a/b", "--dry-run"], capsys)
    assert_one_line_error(code, err, "fp8 has no verify report", "--force")
    code, card, err = run(["publish", out, "--repo", "a/b", "--dry-run", "--force"], capsys)
    assert code == 0 and "fp8 has no verify report" in card


LORA_OUTPUT = '\n[[output]]\nname = "styled"\nconverter = "to-fp8"\nfile = "s.safetensors"\nlora = ["LORA"]\n'


@pytest.mark.parametrize("gate, extra, message", [
    ('{ figure = "latents.psnr_db", max_gap = 1, to = "fp16" }', "", "to = 'fp16': no such output"),
    ('{ figure = "latents.psnr", min = 30 }', "", "gate figure 'latents.psnr': choose"),
    ('{ figure = "pixels.lpips", min = 0.1 }', "", "lower is better, so bound it with max"),
    ('{ figure = "latents.psnr_db", min = 30, max = 40 }', "", "exactly one of min, max, max_gap"),
    ('{ figure = "weights.worst_rel_rmse", max_gap = 1, to = "Q8_0" }', "", "weight figures have none"),
    ('{ figure = "latents.psnr_db", max_gap = 1, to = "styled" }', LORA_OUTPUT, "another model"),
    ('{ figure = "latents.psnr_db", max_gap = 1, to = "Q8_0" }\nverify = { seeds = 3 }', "",
     "verified with other settings"),
    ('{ figure = "latents.psnr_db", min = 30 }\nverify = { enabled = false }', "", "not verified"),
])
def test_bad_gates_are_one_error_and_nothing_is_written(model, tmp_path, capsys, gate, extra, message):
    lora = tiny.make_tiny_lora(tmp_path / "l.safetensors", model)
    outputs = GATED.split("gate =")[0] + f"gate = {gate}\n" + extra.replace("LORA", str(lora))
    code, _, err = run(["recipe", "run", recipe(tmp_path / "r.toml", model, outputs), "--out", tmp_path / "o"],
                       capsys)
    assert_one_line_error(code, err, "r.toml:", message)
    assert not (tmp_path / "o").exists()


def test_judging_reads_infinities_and_refuses_unpaired_reports():
    gate = gates.Gate("latents.psnr_db", "max_gap", 1.0, "other")
    exact = {"settings": {"seeds": [0]}, "samples": [{"prompt": "p", "seed": 0, "latents": {"psnr_db": None}}]}
    ours = {"settings": {"seeds": [0]}, "samples": [{"prompt": "p", "seed": 0, "latents": {"psnr_db": 40.0}}]}
    verdict = gates.judge(gate, ours, exact)
    assert not verdict["passed"] and verdict["mean"] == math.inf  # losing to an exact copy is an unbounded gap
    assert gates.judge(gate, exact, exact)["passed"]  # two exact copies: no gap
    other_seeds = {**exact, "settings": {"seeds": [1]}}
    assert "other samples or settings" in gates.judge(gate, ours, other_seeds)["why"]
    lpips = gates.Gate("pixels.lpips", "max", 0.1)
    assert "not measured" in gates.judge(lpips, {**ours, "pixels_skipped": "--no-decode given"})["why"]
