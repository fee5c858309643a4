"""calibrate's statistics, and to-gguf --imatrix against ggml's importance-weighted quantizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qconvert.core import tiny
from qconvert.core.checkpoint import open_checkpoint
from qconvert.formats.gguf.imatrix import read_imatrix
from qconvert.formats.gguf.reader import open_gguf
from qconvert.formats.inspection import inspect_path
from qconvert.running.calibrate import RecordingProvider
from qconvert.running.model import QwenImageTransformer

from .calibration import make_calibration
from .cli_helpers import assert_one_line_error, run


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.make_tiny(tmp_path_factory.mktemp("calib") / "m", layers=2)


@pytest.fixture(scope="module")
def calib(tmp_path_factory, model):
    return make_calibration(model, tmp_path_factory.mktemp("calib-out") / "calib.safetensors")


def test_recorded_statistics_are_the_inputs(model):
    ckpt = open_checkpoint(model)
    provider = RecordingProvider(ckpt, keep_rows=5)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 64, generator=g)
    text = torch.randn(1, 3, ckpt.config.joint_attention_dim, generator=g)
    with torch.no_grad():
        QwenImageTransformer(ckpt.config, provider)(latents, text, None, torch.tensor([0.5]), [(1, 4, 4)])
    stat = provider.stats["img_in"]
    assert stat.seen == 16
    assert torch.allclose((stat.sq_sum / stat.seen).float(), latents[0].pow(2).mean(0))
    assert torch.equal(stat.absmax, latents[0].abs().amax(0))
    assert stat.rows.shape == (5, 64) and all(any(torch.equal(r, x) for x in latents[0]) for r in stat.rows)
    assert set(provider.stats) >= {"transformer_blocks.1.img_mlp.net.2", "proj_out"}


def test_calibration_file(calib, model):
    tensors = load_file(str(calib))
    assert tensors["transformer_blocks.0.attn.to_q.in_sq_mean"].shape == (256,)
    assert tensors["transformer_blocks.0.img_mlp.net.2.in_rows"].shape == (64, 1024)
    assert int(tensors["transformer_blocks.0.attn.to_q.in_count"]) == 2 * 2 * 16  # prompts x steps x tokens
    imatrix = read_imatrix(calib, open_checkpoint(model))
    assert len(imatrix) == 2 * 14  # every block linear


@pytest.mark.oracle
@pytest.mark.parametrize("level, qtype", [("Q4_K_M", "Q4_K"), ("Q3_K_M", "Q3_K"), ("Q2_K", "Q2_K")])
def test_imatrix_bytes_equal_ggml_and_weighted_error_drops(tmp_path, capsys, model, calib, level, qtype):
    import gguf

    from .ggml_oracle import load

    oracle, why = load()
    if oracle is None:
        pytest.skip(why)
    with_im, without = tmp_path / "im.gguf", tmp_path / "plain.gguf"
    for out, extra in ((with_im, ["--imatrix", calib]), (without, [])):
        code, _, err = run(["to-gguf", model, "--level", level, "--policy", "uniform", "-o", out, "--quiet",
                            *extra], capsys)
        assert code == 0, err
    ckpt = open_checkpoint(model)
    imatrix = read_imatrix(calib, ckpt)
    name = "transformer_blocks.1.img_mlp.net.2.weight"
    stored = {t.name: t for t in open_gguf(with_im).tensors}[name]
    assert stored.tensor_type.name == qtype
    w = ckpt.load(name).float().numpy()
    want = oracle.quantize(w, gguf.GGMLQuantizationType[qtype], imatrix[name].numpy())
    assert np.array_equal(np.asarray(stored.data).reshape(want.shape), want)
    # what the importance matrix buys: error weighted by each input's mean square, over every block linear
    errors = {}
    for label, path in (("im", with_im), ("plain", without)):
        total = 0.0
        for t in open_gguf(path).tensors:
            if t.name in imatrix:
                deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ckpt.tensors[t.name].shape)
                diff = deq - ckpt.load(t.name).float().numpy()
                total += float((diff ** 2 * imatrix[t.name].numpy()[None, :]).sum())
        errors[label] = total
    assert errors["im"] < errors["plain"]
    assert "sha256:" in inspect_path(with_im)["metadata"]["qconvert.imatrix"]


def test_calibration_of_another_model_is_refused(tmp_path, capsys, calib):
    other = tiny.make_tiny(tmp_path / "o", layers=2, heads=1)
    out = tmp_path / "x.gguf"
    code, _, err = run(["to-gguf", other, "--level", "Q4_K_M", "--imatrix", calib, "-o", out], capsys)
    assert_one_line_error(code, err, "calib.safetensors", "has 256 values; this model's layer takes 128 inputs")
    assert not out.exists()


def test_calibrate_needs_prompts(tmp_path, capsys, model):
    code, _, err = run(["calibrate", model, "-o", tmp_path / "c.safetensors"], capsys)
    assert code == 2 and "--synthetic N" in err


def test_calibrate_command(tmp_path, capsys, model):
    out = tmp_path / "c.safetensors"
    code, stdout, err = run(["calibrate", model, "--synthetic", 1, "--height", 32, "--width", 32, "--steps", 1,
                             "--schedule", "lightning", "--keep-rows", 3, "-o", out], capsys)
    assert code == 0, err
    assert "1 prompt(s) x 1 steps = 1 model runs of 2 blocks" in stdout
    code, _, err = run(["calibrate", model, "--synthetic", 1, "--steps", 1, "-o", tmp_path / "q.safetensors"], capsys)
    assert_one_line_error(code, err, "--steps 1: the qwen schedule needs at least 2 steps")
    assert load_file(str(out))["img_in.in_rows"].shape == (3, 64)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_llama_cpp_gguf_imatrix_gives_the_same_bytes(tmp_path, capsys, model, calib, prefix):
    """An imatrix in llama.cpp's GGUF format (in_sum2 / counts), written with gguf-py as its tools do."""
    import gguf

    tensors = load_file(str(calib))
    writer = gguf.GGUFWriter(str(tmp_path / "imatrix.gguf"), arch="imatrix")
    writer.add_array("imatrix.datasets", ["synthetic"])
    writer.add_uint32("imatrix.chunk_count", 2)
    writer.add_uint32("imatrix.chunk_size", 16)
    for key in sorted(tensors):
        if key.endswith(".in_sq_mean"):
            base = prefix + key[: -len(".in_sq_mean")] + ".weight"
            count = float(tensors[key[: -len("in_sq_mean")] + "in_count"])
            writer.add_tensor(base + ".in_sum2", (tensors[key].double() * count).float().numpy())
            writer.add_tensor(base + ".counts", np.array([count], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    outs = {}
    for label, im in (("gguf", tmp_path / "imatrix.gguf"), ("ours", calib)):
        outs[label] = tmp_path / f"{label}.gguf"
        code, _, err = run(["to-gguf", model, "--level", "Q3_K_M", "--imatrix", im, "--minimal-metadata",
                            "-o", outs[label], "--quiet"], capsys)
        assert code == 0, err
    assert outs["gguf"].read_bytes() == outs["ours"].read_bytes()


@pytest.mark.slow
def test_calibration_memory_does_not_grow_with_depth_beyond_its_statistics(tmp_path):
    """At 512² the statistics are ~1.2 MB a block (31 MB for 26 blocks); allocated as layers were first seen
    they let peak RSS grow by ~440 MB from 2 to 26 blocks (the allocator could not return the temporaries
    below them).  Now it grows by 40-130 MB (the allocator's behaviour varies run to run); holding the
    float32 weights would add 250 MB more."""
    from tests.test_memory import peak_rss_mb

    peaks = []
    for layers in (2, 26):
        model = tiny.make_tiny(tmp_path / f"m{layers}", layers=layers, seed=1)
        peaks.append(peak_rss_mb(["calibrate", model, "--synthetic", "1", "--height", "512", "--width", "512",
                                  "--steps", "2", "-o", tmp_path / f"c{layers}.safetensors", "-q"]))
    assert peaks[1] - peaks[0] < 160, peaks
