"""``to-gguf --policy measured``: each block linear's type chosen by the block measure within a size."""

from __future__ import annotations

import contextlib
import io
import json
import os

import gguf
import pytest

from qconvert.cli import main
from qconvert.core import tiny
from qconvert.running import stats
from tests.cli_helpers import assert_one_line_error, run

LEVELS = ("Q4_K_M", "Q3_K_M", "Q2_K")


@pytest.fixture(scope="module")
def two_blocks(tmp_path_factory):
    """Two blocks: a measurement runs every linear of each in eight types, twice the blocks of the tiny one."""
    return tiny.make_tiny(tmp_path_factory.mktemp("m") / "tiny-qwen-image", layers=2)


@pytest.fixture(scope="module")
def measured(two_blocks, tmp_path_factory):
    """The two-block model at three levels, measured (one measurement serves them all): (folder, --json report)."""
    out = tmp_path_factory.mktemp("measured")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exc:
        main(["to-gguf", str(two_blocks), "--level", ",".join(LEVELS), "--policy", "measured", "-o", str(out),
              "--json"])
    assert exc.value.code == 0
    return out, json.loads(printed.getvalue())


def test_measured_files_fit_city96_sizes_and_say_how_they_were_chosen(two_blocks, measured, capsys):
    out, report = measured
    code, stdout, err = run(["to-gguf", two_blocks, "--level", ",".join(LEVELS), "-o", out, "--json", "--dry-run",
                             "--minimal-metadata"], capsys)                    # city96's published sizes
    for ours, city96 in zip(report["files"], json.loads(stdout)["files"]):
        assert ours["level"] == city96["level"] and report["measured"][ours["level"]]["target_bytes"] == city96["bytes"]
        assert ours["bytes"] == os.path.getsize(ours["output"]) <= city96["bytes"]
        reader = gguf.GGUFReader(ours["output"])
        text = {f.name: str(bytes(f.parts[f.data[-1]]), "utf-8") for f in reader.fields.values()
                if f.name.startswith("qconvert.")}
        assert text["qconvert.policy"] == "measured" and "after the next block" in text["qconvert.measured_on"]
        layers = report["measured"][ours["level"]]["layers"]
        stored = {t.name: t.tensor_type.name for t in reader.tensors}
        assert all(stored[f"{m}.weight"] == e["type"] for m, e in layers.items())
        assert len({e["type"] for e in layers.values()}) > 1                      # a mix, not one type
    layer = report["measured"]["Q3_K_M"]["layers"]["transformer_blocks.1.img_mod.1"]
    assert set(layer["candidates"]) == {"Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "BF16"}
    assert layer["error"] == layer["candidates"][layer["type"]]


def test_measured_bad_input(tiny_model, full_size_sparse, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert_one_line_error(*run(["to-gguf", tiny_model, "--level", "Q4_K_M", "--policy", "measured", "--target-size",
                                "0.001", "-o", out], capsys)[::2], "smallest type", "larger size")
    assert_one_line_error(*run(["to-gguf", tiny_model, "--level", "Q4_K_M", "--policy", "measured", "--target-size",
                                "1", "-o", out], capsys)[::2], "BF16", "smaller size")
    assert_one_line_error(*run(["to-gguf", full_size_sparse, "--level", "Q4_K_M", "--policy", "measured", "-o",
                                out, "--dry-run"], capsys)[::2], "all zeros", "real weights")
    code, _, err = run(["to-gguf", tiny_model, "--level", "Q4_K_M,Q2_K", "--policy", "measured", "--target-size",
                        "0.005", "-o", tmp_path], capsys)
    assert code == 2 and "one --level" in err
    code, _, err = run(["to-gguf", tiny_model, "--level", "Q4_K_M", "--target-size", "0.005", "-o", out], capsys)
    assert code == 2 and "--target-size is for --policy measured" in err
    assert not out.exists()


@pytest.mark.slow
def test_measured_beats_city96_and_quantstack_at_their_sizes(two_blocks, measured, tmp_path, capsys):
    """Issue 21's ordering on a tiny model: at city96's sizes for Q4_K_M, Q3_K_M and Q2_K the measured file
    verifies closer to the source than city96's and quantstack's files of that level, the paired gain's 95%
    interval above zero (verify at 128x128, 4 held-out samples, to keep CI short); with an imatrix too, at
    Q3_K_M, asked for by --target-size (city96's size), its plan printed up front."""
    def psnr(path):
        report = tmp_path / "r" / path.parent.name / path.name
        code, _, err = run(["verify", path, "--reference", two_blocks, "--report", report, "--synthetic", 2,
                            "--seeds", 2, "--height", 128, "--width", 128, "--no-decode"], capsys)
        assert code == 0, err
        return [s["latents"]["psnr_db"] for s in json.loads((report / "report.json").read_text())["samples"]]

    def files(policy, levels, *extra, folder=None):
        out = tmp_path / (folder or policy)
        if len(levels) == 1:  # -o names the file for one level
            out = out / f"tiny-qwen-image-{levels[0]}.gguf"
        code, stdout, err = run(["to-gguf", two_blocks, "--level", ",".join(levels), "--policy", policy, "-o", out,
                                 *extra], capsys)
        assert code == 0, err
        return stdout + err

    folder, report = measured
    for policy in ("city96", "quantstack"):
        files(policy, LEVELS, "-q")
    for level in LEVELS:
        name = f"tiny-qwen-image-{level}.gguf"
        ours = psnr(folder / name)
        for policy in ("city96", "quantstack"):
            gain = stats.paired_gap(ours, psnr(tmp_path / policy / name))
            assert gain["low"] > 0, (level, policy, gain)

    calib = tmp_path / "calib.safetensors"
    code, _, err = run(["calibrate", two_blocks, "--synthetic", 1, "--steps", 2, "--height", 64, "--width", 64,
                        "-o", calib, "-q"], capsys)
    assert code == 0, err
    target = report["measured"]["Q3_K_M"]["target_bytes"]
    said = files("measured", ("Q3_K_M",), "--imatrix", calib, "--target-size", target / 1e9,
                 folder="imatrix-measured")
    assert "Q3_K_M measured, within " in said and "transformer_blocks.0.attn.to_q " in said and "(else " in said
    for policy in ("city96", "quantstack"):
        files(policy, ("Q3_K_M",), "--imatrix", calib, "-q", folder=f"imatrix-{policy}")
    ours = psnr(tmp_path / "imatrix-measured" / "tiny-qwen-image-Q3_K_M.gguf")
    assert (tmp_path / "imatrix-measured" / "tiny-qwen-image-Q3_K_M.gguf").stat().st_size <= target
    for policy in ("city96", "quantstack"):
        gain = stats.paired_gap(ours, psnr(tmp_path / f"imatrix-{policy}" / "tiny-qwen-image-Q3_K_M.gguf"))
        assert gain["low"] > 0, ("imatrix", policy, gain)
