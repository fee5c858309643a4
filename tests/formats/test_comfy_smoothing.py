"""NVFP4 with AWQ-style smoothing (``to-comfy --format nvfp4 --smooth --calib``): the stored weight is comfy-kitchen's
NVFP4 of the weight divided by ``pre_quant_scale``, and ComfyUI's forward (input times the factor, then the
NVFP4 matmul; comfy/ops.py at 0271a469) computes the source layer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qconvert.core import tiny
from qconvert.core.checkpoint import open_checkpoint, read_safetensors_header
from qconvert.core.errors import CheckpointError
from qconvert.formats.comfyui.loader import FP8File
from qconvert.running import smoothing
from tests.calibration import make_calibration
from tests.cli_helpers import assert_one_line_error, run
from tests.formats.weights import outlier_weight

ck = pytest.importorskip("comfy_kitchen", reason="comfy-kitchen (pip install comfy-kitchen) is the oracle")
pytestmark = pytest.mark.oracle

LAYER = "transformer_blocks.0.attn.to_q"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.make_tiny(tmp_path_factory.mktemp("smooth") / "m", layers=1, heads=2, head_dim=64, text_dim=64)


@pytest.fixture(scope="module")
def calib(tmp_path_factory, model):
    return make_calibration(model, tmp_path_factory.mktemp("smooth-calib") / "calib.safetensors", size=32, prompts=1)


@pytest.fixture(scope="module")
def smoothed(tmp_path_factory, model, calib):
    from qconvert.converters.base import Source
    from qconvert.converters.comfy import ComfyCommandOptions
    from qconvert.converters.comfy import run as to_comfy

    out = tmp_path_factory.mktemp("smooth-out") / "s.safetensors"
    result = to_comfy(Source(str(model)), ComfyCommandOptions(fmt="nvfp4", smooth=True, calib=calib), out, quiet=True)
    return out, result.text


def test_search_smooths_loud_channels_and_measures_the_plain_layer_too():
    """Activations with outlier channels (as Qwen-Image's have): smoothing lowers the native runtime's error;
    the plain candidate is the unsmoothed layer exactly (factor 1)."""
    g = torch.Generator().manual_seed(0)
    w = outlier_weight(256, 512)
    rows = torch.randn(64, 512, generator=g)
    rows[:, :8] *= 30  # a few loud input channels
    found = smoothing.search(w, None, rows, rows.abs().amax(0))
    assert found.pre_quant_scale.dtype == torch.bfloat16 and bool((found.pre_quant_scale > 0).all())
    assert (found.alpha, found.beta) != (0.0, 0.0) and found.error < 0.8 * found.plain_error
    ref = rows @ w.T
    plain = smoothing.layer_output(w, None, rows, "nvfp4", "native", None)
    assert smoothing.output_error(plain, ref) == pytest.approx(found.plain_error, rel=1e-6)


def test_stored_layers_are_comfy_kitchens_nvfp4_of_the_smoothed_weight(smoothed, model):
    out, text = smoothed
    tensors = load_file(out)
    source = open_checkpoint(model)
    layers = [k[: -len(".pre_quant_scale")] for k in tensors if k.endswith(".pre_quant_scale")]
    assert LAYER in layers and len(layers) == sum(k.endswith(".comfy_quant") for k in tensors)
    for layer in layers:
        factor = tensors[f"{layer}.pre_quant_scale"]
        w = source.load(f"{layer}.weight").float()
        assert factor.dtype == torch.bfloat16 and factor.shape == (w.shape[1],) and bool((factor > 0).all())
        target = w / factor.float()
        g = target.abs().amax() / 2688
        q, s = ck.quantize_nvfp4(target, g)
        assert torch.equal(tensors[f"{layer}.weight"], q)
        assert torch.equal(tensors[f"{layer}.weight_scale"].view(torch.uint8), s.view(torch.uint8))
        assert float(tensors[f"{layer}.weight_scale_2"]) == float(g)
    # ComfyUI's forward: input times the factor, then the NVFP4 layer (here comfy-kitchen's dequantization)
    factor = tensors[f"{LAYER}.pre_quant_scale"]
    x = torch.randn(5, factor.shape[0], generator=torch.Generator().manual_seed(1))
    deq = ck.dequantize_nvfp4(tensors[f"{LAYER}.weight"], tensors[f"{LAYER}.weight_scale_2"],
                              tensors[f"{LAYER}.weight_scale"], torch.float32)
    comfy = (x * factor.float()) @ deq.T
    ours = x @ FP8File(out).load(f"{LAYER}.weight").T  # the loader's dense weight has the smoothing folded in
    assert torch.allclose(ours, comfy, rtol=1e-5, atol=1e-6)
    assert "smoothing:" in text and "layers smoothed" in text and "applies pre_quant_scale" in text


def test_a_release_card_says_what_a_smoothed_file_needs():
    from qconvert.releases.hub import guide

    assert "applies pre_quant_scale" in guide("comfy-nvfp4-smoothed")[1]
    assert "pre_quant_scale" not in guide("comfy-nvfp4")[1]


def test_metadata_records_how_the_factors_were_chosen(smoothed, calib):
    out, _ = smoothed
    info = json.loads(read_safetensors_header(out).metadata["qconvert"])
    recorded = info["options"]["smoothing"]
    assert recorded["calibration"] == calib.name and len(recorded["sha256"]) == 64
    assert recorded["runtime"] == "native" and recorded["grid"] == smoothing.DEFAULT_GRID


def test_verify_runs_the_smoothed_layers_as_comfyui_does(smoothed, model, tmp_path):
    """The native provider multiplies the input by the factor before quantizing it, as ComfyUI does."""
    from qconvert.codecs.comfyui.registry import activations
    from qconvert.formats.opener import open_output
    from qconvert.running.providers import native_provider

    out, _ = smoothed
    weights, kind = open_output(out)
    assert kind == "comfy-nvfp4"
    provider = native_provider(weights)
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(2))
    stored = load_file(out)
    factor = stored[f"{LAYER}.pre_quant_scale"].float()
    deq = ck.dequantize_nvfp4(stored[f"{LAYER}.weight"], stored[f"{LAYER}.weight_scale_2"],
                              stored[f"{LAYER}.weight_scale"], torch.float32)
    expected = activations(x * factor, "nvfp4", {"format": "nvfp4"}, None) @ deq.T + stored[f"{LAYER}.bias"].float()
    assert torch.allclose(provider.linear(LAYER)(x), expected, rtol=1e-4, atol=1e-5)


def test_bad_requests(model, calib, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    code, _, err = run(["to-comfy", model, "--format", "nvfp4", "--smooth", "-o", out], capsys)
    assert_one_line_error(code, err, "--smooth needs --calib")
    code, _, err = run(["to-comfy", model, "--format", "int8", "--smooth", "--calib", calib, "-o", out], capsys)
    assert code == 2 and "--smooth is for --format nvfp4" in err
    other = tiny.make_tiny(tmp_path / "o", layers=1, heads=1, head_dim=64, text_dim=64)
    code, _, err = run(["to-comfy", other, "--format", "nvfp4", "--smooth", "--calib", calib, "-o", out], capsys)
    assert_one_line_error(code, err, "calib.safetensors", "a calibration of another model")
    assert not out.exists()


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.__setitem__(f"{LAYER}.pre_quant_scale", torch.zeros(128, dtype=torch.bfloat16)), "zero, negative"),
    (lambda t: t.__setitem__(f"{LAYER}.pre_quant_scale", torch.ones(64, dtype=torch.bfloat16)), "128 inputs"),
    (lambda t: t.__setitem__("transformer_blocks.0.img_mod.1.pre_quant_scale", torch.ones(128, dtype=torch.bfloat16)),
     "only to an nvfp4 layer"),
])
def test_damaged_smoothing_is_refused(smoothed, tmp_path, damage, message):
    tensors = load_file(smoothed[0])
    damage(tensors)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata=read_safetensors_header(smoothed[0]).metadata)
    with pytest.raises(CheckpointError, match=message):
        FP8File(bad)


def test_dry_run_plans_the_exact_size(smoothed, model, calib):
    from qconvert.converters.base import Source
    from qconvert.converters.comfy import ComfyCommandOptions
    from qconvert.converters.comfy import run as to_comfy

    out, _ = smoothed
    planned = to_comfy(Source(str(model)), ComfyCommandOptions(fmt="nvfp4", smooth=True, calib=calib), out,
                       dry_run=True, quiet=True).report
    assert planned["bytes"] == out.stat().st_size and not planned["written"]
