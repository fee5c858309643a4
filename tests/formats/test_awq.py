"""ComfyUI's ``awq_w4a16`` against comfy-kitchen's layout (its dequantization and its W4A16 matmul): comfy-kitchen
has no quantizer for it, so the oracle is what ComfyUI computes from the stored tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qconvert.codecs.comfyui.layouts.awq import decode_awq, encode_awq
from qconvert.core import tiny
from qconvert.core.checkpoint import open_checkpoint, read_safetensors_header
from qconvert.core.errors import CheckpointError
from qconvert.formats.comfyui.loader import FP8File
from tests.cli_helpers import assert_one_line_error, run
from tests.formats.weights import outlier_weight

ck = pytest.importorskip("comfy_kitchen", reason="comfy-kitchen (pip install comfy-kitchen) is the oracle")
pytestmark = pytest.mark.oracle

LAYER = "transformer_blocks.0.attn.to_q"


def _comfy_kitchen_weight(t: dict, shape: tuple, dtype=torch.float32) -> torch.Tensor:
    from comfy_kitchen.tensor import QuantizedTensor, TensorCoreAWQW4A16Layout

    params = TensorCoreAWQW4A16Layout.Params(scale=t["weight_scale"].to(dtype), zeros=t["weight_zeros"].to(dtype),
                                             orig_dtype=dtype, orig_shape=shape, group_size=64)
    return QuantizedTensor(t["weight"], "TensorCoreAWQW4A16Layout", params).dequantize()


@pytest.mark.parametrize("w", [outlier_weight(384, 1024), outlier_weight(64, 128, seed=2), torch.zeros(32, 256),
                               torch.full((16, 64), 0.375)], ids=["outliers", "small", "zeros", "constant"])
def test_decode_is_comfy_kitchens_and_rounds_to_nearest(w):
    t, conf = encode_awq(w)
    shape = tuple(w.shape)
    assert conf == {"format": "awq_w4a16", "group_size": 64}
    assert t["weight"].dtype == torch.int8 and t["weight"].shape == (shape[0], shape[1] // 2)
    assert t["weight_scale"].dtype == t["weight_zeros"].dtype == torch.bfloat16
    assert t["weight_scale"].shape == t["weight_zeros"].shape == (shape[1] // 64, shape[0])
    ours = decode_awq(t, shape)
    assert torch.equal(ours, _comfy_kitchen_weight(t, shape))
    step = t["weight_scale"].float().T.repeat_interleave(64, dim=1)
    zero = t["weight_zeros"].float().T.repeat_interleave(64, dim=1)
    # ComfyUI dequantizes in its compute dtype: the product and the sum each rounded to BF16
    in_bf16 = _comfy_kitchen_weight(t, shape, torch.bfloat16).float()
    assert bool(((in_bf16 - ours).abs() <= 2 ** -8 * (8 * step + zero.abs() + ours.abs())).all())
    x = torch.randn(3, shape[1], generator=torch.Generator().manual_seed(0))
    y = ck.gemv_awq_w4a16(x, t["weight"], t["weight_scale"].float(), t["weight_zeros"].float(), group_size=64)
    assert torch.allclose(y, x @ ours.T, rtol=1e-5, atol=1e-5)
    # round to nearest: within half a step of the (BF16) scale, plus the zero point's BF16 rounding
    assert bool(((ours - w).abs() <= step / 2 + zero.abs() * 2 ** -8 + 1e-6).all())
    if not w.any():
        assert not ours.any()


def test_file_loads_and_runs_weight_only(tmp_path, capsys):
    model = tiny.make_tiny(tmp_path / "m", layers=1, heads=2, head_dim=64, text_dim=64)
    out = tmp_path / "awq.safetensors"
    code, text, err = run(["to-comfy", model, "--format", "awq-w4a16", "-o", out], capsys)
    assert code == 0, err
    assert "awq_w4a16" in text and "weight-only" in text
    tensors = load_file(out)
    assert json.loads(tensors[f"{LAYER}.comfy_quant"].numpy().tobytes()) == {"format": "awq_w4a16", "group_size": 64}
    source = open_checkpoint(model)
    w = source.load(f"{LAYER}.weight").float()
    assert torch.equal(FP8File(out).load(f"{LAYER}.weight"), decode_awq(encode_awq(w)[0], tuple(w.shape)))
    assert "transformer_blocks.0.img_mod.1.comfy_quant" not in tensors  # comfy-quants' policy, as NVFP4's
    figures = {}
    for runtime in ("native", "dequantized"):
        code, _, err = run(["verify", out, "--reference", model, "--report", tmp_path / runtime, "--height", 32,
                            "--width", 32, "--steps", 1, "--no-decode", "--runtime", runtime], capsys)
        assert code == 0, err
        figures[runtime] = json.loads((tmp_path / runtime / "report.json").read_text())["latents"]["rel_rmse"]
    assert figures["native"] == figures["dequantized"]  # no activation quantization
    damaged = dict(tensors)
    damaged[f"{LAYER}.weight_zeros"] = torch.full_like(tensors[f"{LAYER}.weight_zeros"], float("nan"))
    save_file(damaged, tmp_path / "nan.safetensors", metadata=read_safetensors_header(out).metadata)
    with pytest.raises(CheckpointError, match="weight_zeros holds non-finite"):
        FP8File(tmp_path / "nan.safetensors")
    damaged = dict(tensors)
    damaged[f"{LAYER}.comfy_quant"] = torch.frombuffer(bytearray(b'{"format": "awq_w4a16", "group_size": 48}'),
                                                       dtype=torch.uint8)
    save_file(damaged, tmp_path / "group.safetensors", metadata=read_safetensors_header(out).metadata)
    with pytest.raises(CheckpointError, match="group_size 48"):
        FP8File(tmp_path / "group.safetensors")


def test_inputs_its_group_does_not_divide_are_refused(tmp_path, capsys):
    model = tiny.make_tiny(tmp_path / "m", layers=1, heads=3, head_dim=16, text_dim=48)  # 48 inputs
    out = tmp_path / "x.safetensors"
    code, _, err = run(["to-comfy", model, "--format", "awq-w4a16", "-o", out], capsys)
    assert_one_line_error(code, err, "not a multiple of 64", "awq-w4a16")
    assert not out.exists()
