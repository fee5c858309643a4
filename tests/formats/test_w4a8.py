"""ComfyUI's ``asym_w4a8_int8`` (W4A8 and W6A8) against comfy-kitchen, the quantizer and runtime ComfyUI runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qconvert.codecs.comfyui import registry
from qconvert.codecs.comfyui.blocks import rotate
from qconvert.codecs.comfyui.layouts import w4a8
from qconvert.core import tiny
from qconvert.core.checkpoint import open_checkpoint, read_safetensors_header
from qconvert.formats.comfyui.loader import FP8File
from tests.cli_helpers import run
from tests.formats.weights import outlier_weight

ck = pytest.importorskip("comfy_kitchen", reason="comfy-kitchen (pip install comfy-kitchen) is the oracle")
pytestmark = pytest.mark.oracle


def spiky_after_rotation(rows=96, cols=512, seed=5):
    """A few non-zeros per row once rotated: heavy-tailed groups, so comfy-kitchen fits its own codebook."""
    g = torch.Generator().manual_seed(seed)
    sparse = torch.zeros(rows, cols)
    sparse.scatter_(1, torch.randint(0, cols, (rows, 6), generator=g), torch.randn(rows, 6, generator=g))
    return rotate(sparse, 256)


WEIGHTS = {
    "outliers": outlier_weight,
    "all-zero": lambda: torch.zeros(32, 256),
    "trained-bf16": lambda: tiny.trained_like("transformer_blocks.0.img_mlp.net.2.weight", (192, 768), 0)
    .to(torch.bfloat16).float(),
    "fitted-codebook": spiky_after_rotation,
    "ragged-rows": lambda: torch.randn(301, 256, generator=torch.Generator().manual_seed(2)),
    "row-chunks": lambda: torch.randn(1400, 3072, generator=torch.Generator().manual_seed(3)) * 0.02,  # > 4M elements
}


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("case", sorted(WEIGHTS))
def test_bytes_equal_comfy_kitchen(case, bits):
    w = WEIGHTS[case]()
    t, conf = w4a8.encode_w4a8(w, bits)
    q, s_rel, s_channel, correction, codebook = ck.quantize_w4a8_int8_weight(w, bits=bits)
    assert correction is None
    assert torch.equal(t["weight"], q)
    assert torch.equal(t["weight_s_rel"].view(torch.uint8), s_rel.view(torch.uint8))
    assert torch.equal(t["weight_s_channel"], s_channel)
    if bits == 4:
        assert torch.equal(t["weight_codebook"], codebook)
    else:
        assert codebook is None and "weight_codebook" not in t
    assert conf == {"format": "asym_w4a8_int8", "group_size": 16, "convrot": True, "convrot_groupsize": 256}
    theirs = ck.dequantize_w4a8_int8_weight(q, s_rel, s_channel, codebook=codebook, output_dtype=torch.float32)
    assert torch.equal(w4a8.decode_w4a8(t, tuple(w.shape), conf), theirs)


def test_the_heavy_tailed_case_does_fit_a_codebook():
    _, _, _, _, codebook = ck.quantize_w4a8_int8_weight(spiky_after_rotation())
    assert not torch.allclose(codebook, torch.tensor(w4a8.GAUSSIAN_LEVELS))


def test_packing_round_trips_lane_by_lane():
    codes = torch.randint(0, 64, (3, 512), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    packed = w4a8.pack_codes(codes, 6)
    assert packed.shape == (3, 384) and torch.equal(w4a8.unpack_codes(packed, 512, 6), codes)
    low = w4a8.pack_codes(codes & 0xF, 4).view(torch.uint8)
    assert int(low[0, 0]) == int(codes[0, 0] & 0xF) | int(codes[0, 1] & 0xF) << 4     # even column, low nibble
    assert int(packed.view(torch.uint8)[0, 256]) >> 2 & 0x3 == int(codes[0, 1]) >> 4  # column 1: byte 0, bits 2-3


# ------------------------------------------------------------------ files


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    from qconvert.formats.comfyui import writer as comfy

    root = tmp_path_factory.mktemp("w4a8")
    model = tiny.make_tiny(root / "m")
    paths = {}
    for fmt in ("w4a8", "w6a8"):
        paths[fmt] = root / f"{fmt}.safetensors"
        comfy.convert(open_checkpoint(model), paths[fmt], comfy.make_options(fmt), quiet=True)
    return model, paths


@pytest.mark.parametrize("fmt", ["w4a8", "w6a8"])
def test_files_hold_comfy_kitchens_bytes_and_load_as_comfyui_loads_them(written, fmt):
    """Each layer equals comfy-kitchen's quantization of the source weight; ComfyUI's loader step (the layout's
    params from weight_s_rel, weight_s_channel, weight_codebook, group_size and convrot_groupsize) dequantizes
    it to qconvert's decoding, and its INT8 linear on the CPU agrees with verify's native emulation."""
    from comfy_kitchen.tensor import AsymW4A8Int8Layout, QuantizedTensor

    model, paths = written
    tensors = load_file(paths[fmt])
    source = open_checkpoint(model)
    layers = sorted(k.removesuffix(".comfy_quant") for k in tensors if k.endswith(".comfy_quant"))
    assert len(layers) >= 30
    ours = FP8File(paths[fmt])
    fmt_obj = registry.layer_format(fmt)
    x = torch.randn(5, 4, 256, generator=torch.Generator().manual_seed(0))
    for layer in layers:
        conf = json.loads(tensors[f"{layer}.comfy_quant"].numpy().tobytes())
        assert conf == {"format": "asym_w4a8_int8", "group_size": 16, "convrot": True, "convrot_groupsize": 256}
        src = source.load(f"{layer}.weight").float()
        q, s_rel, s_channel, _, codebook = ck.quantize_w4a8_int8_weight(src, bits=fmt_obj.bits)
        assert torch.equal(tensors[f"{layer}.weight"], q), layer
        assert torch.equal(tensors[f"{layer}.weight_s_rel"].view(torch.uint8), s_rel.view(torch.uint8)), layer
        assert torch.equal(tensors[f"{layer}.weight_s_channel"], s_channel), layer
        params = AsymW4A8Int8Layout.Params(
            scale=tensors[f"{layer}.weight_s_rel"].view(torch.float8_e4m3fn),
            s_channel=tensors[f"{layer}.weight_s_channel"], codebook=tensors.get(f"{layer}.weight_codebook"),
            orig_dtype=torch.float32, orig_shape=tuple(src.shape), group_size=conf["group_size"],
            convrot_groupsize=conf["convrot_groupsize"])
        qt = QuantizedTensor(tensors[f"{layer}.weight"], "AsymW4A8Int8Layout", params)
        mine = ours.load(f"{layer}.weight")
        assert torch.equal(mine, qt.dequantize().float()), layer
        assert float((mine - src).norm() / src.norm()) < (0.15 if fmt == "w4a8" else 0.05), layer
        inputs = x[..., : src.shape[1]] if src.shape[1] <= 256 else torch.randn(5, 4, src.shape[1])
        theirs = torch.nn.functional.linear(inputs, qt)          # rotated INT8 activations, INT8 matmul
        emulated = fmt_obj.activations(inputs, conf, None) @ mine.T
        assert float((theirs - emulated).norm() / theirs.norm()) < 1e-4, layer


def test_w4a8_cli(written, tmp_path, capsys):
    model, paths = written
    for fmt in ("w4a8", "w6a8"):
        code, out, err = run(["to-comfy", model, "--format", fmt, "--dry-run", "--json"], capsys)
        assert code == 0, err
        assert json.loads(out)["bytes"] == paths[fmt].stat().st_size
        assert "ComfyUI v0.31.0" in json.loads(out)["needs"]
    code, out, err = run(["inspect", paths["w6a8"], "--json"], capsys)   # each layer's inputs from its group scales
    assert code == 0 and "asym_w4a8_int8" in json.dumps(json.loads(out)["layer_formats"]), err
    header = read_safetensors_header(paths["w4a8"])
    layer = "transformer_blocks.1.attn.to_q"
    assert header.tensors[f"{layer}.weight_s_rel"].dtype == "F8_E4M3"
    assert header.tensors[f"{layer}.weight_codebook"].shape == (16,)
    small = tiny.make_tiny(tmp_path / "small", layers=1, heads=2, head_dim=32, text_dim=64)
    code, out, err = run(["to-comfy", small, "--format", "w4a8", "-o", tmp_path / "x.safetensors"], capsys)
    # block 0's img_mod.1 stays BF16 (as for NVFP4); of the other 13, the 11 with 64 inputs fall back
    assert code == 0 and "13 linears quantized" in out and "row-wise INT8 without ConvRot for 11 linears" in out, err
