"""The command line: inspect, make-tiny, demo, and the error conventions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.cli_helpers import assert_one_line_error, run


def test_inspect_text(tiny_model, capsys):
    code, out, err = run(["inspect", tiny_model], capsys)
    assert code == 0, err
    assert "qwen_image, variant qwen-image" in out
    assert "109 tensors" in out and "7,464,768" in out and "BF16" in out


def test_inspect_json_full_size(full_size_sparse, capsys):
    code, out, _ = run(["inspect", full_size_sparse, "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["tensors"] == 1933 and info["parameters"] == 20_430_401_088
    assert info["types"]["BF16"]["tensors"] == 1933
    assert info["config"]["num_layers"] == 60


def test_inspect_single_file(tiny_single_file, capsys):
    code, out, _ = run(["inspect", tiny_single_file, "--json"], capsys)
    assert code == 0 and json.loads(out)["layout"] == "single-file"


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_model, capsys):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    shard = sorted((model / "transformer").glob("*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    assert_one_line_error(*run(["inspect", model], capsys)[::2], "truncated")
    pickle = tmp_path / "model.ckpt"
    torch.save({}, pickle)
    assert_one_line_error(*run(["inspect", pickle], capsys)[::2], "pickle")
    assert_one_line_error(*run(["inspect", tmp_path / "nope"], capsys)[::2], "no such file")


def test_usage_error_exits_2(capsys):
    code, _, err = run(["make-tiny"], capsys)
    assert code == 2 and "Missing argument" in err
    code, _, err = run(["no-such-command"], capsys)
    assert code == 2


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qconvert", "inspect", str(tmp_path / "nope"), "--debug"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "CheckpointError" in proc.stderr


def test_console_script_and_module_entry_points(tmp_path):
    exe = shutil.which("qconvert")
    if exe is None:
        pytest.skip("the qconvert console script is not installed (pip install -e .)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "qconvert" in out.stdout
    out = subprocess.run([sys.executable, "-m", "qconvert", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "inspect" in out.stdout


def test_make_tiny_cli(tmp_path, capsys):
    code, out, err = run(["make-tiny", tmp_path / "m", "--layers", "1", "--heads", "1", "--seed", "7"], capsys)
    assert code == 0, err
    assert (tmp_path / "m" / "transformer" / "config.json").is_file()
    code, _, err = run(["make-tiny", tmp_path / "s.safetensors", "--single-file", "--layers", "1",
                        "--variant", "edit-2511"], capsys)
    assert code == 0, err
    code, out, _ = run(["inspect", tmp_path / "s.safetensors", "--json"], capsys)
    assert json.loads(out)["variant"] == "qwen-image-edit-2511"


def test_demo(demo_run):
    folder, code, out, err = demo_run  # shared with the golden test, which hashes the same files
    assert code == 0, err
    assert "tiny model" in out and "done:" in out
    reports = sorted((folder / "demo" / "reports").glob("*/report.json"))
    # Q8_0, Q4_K_M, FP8, NVFP4, MXFP8, INT8 ConvRot, W4A8, a budgeted mix, diffusers fp8r and nvfp4, SVDQuant,
    # baked LoRA
    assert len(reports) == 12 and out.count("verify          ") == 12
    assert "fp8r (diffusers)" in out and "nvfp4 (diffusers)" in out
    release = folder / "demo" / "release"  # a small release: built, verified, recorded, described
    manifest = json.loads((release / "manifest.json").read_text())
    assert len(manifest["outputs"]) == 3 and all(e.get("verify") for e in manifest["outputs"].values())
    assert (release / "README.md").read_text().startswith("---\nbase_model:") and "release " in out
