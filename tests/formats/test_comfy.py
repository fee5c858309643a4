"""ComfyUI's NVFP4, MXFP8 and INT8 (ConvRot) layers against comfy-kitchen, the quantizers ComfyUI runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qconvert.codecs.comfyui import blocks
from qconvert.codecs.comfyui.layouts import int8, mxfp8, nvfp4, w4a4
from qconvert.core import tiny
from qconvert.core.checkpoint import open_checkpoint, read_safetensors_header
from qconvert.core.models import qwen_image as qi
from qconvert.formats.comfyui.loader import FP8File
from tests.cli_helpers import assert_one_line_error, run
from tests.formats.weights import outlier_weight

ck = pytest.importorskip("comfy_kitchen", reason="comfy-kitchen (pip install comfy-kitchen) is the oracle")
pytestmark = pytest.mark.oracle


weight = outlier_weight


@pytest.mark.parametrize("shape", [(384, 1024), (256, 3072), (128, 256)])
def test_bytes_equal_comfy_kitchen(shape):
    w = weight(*shape)
    t, conf = nvfp4.encode_nvfp4(w)
    g = w.abs().amax() / 2688
    q, s = ck.quantize_nvfp4(w, g)
    assert conf == {"format": "nvfp4"} and float(t["weight_scale_2"]) == float(g)
    assert torch.equal(t["weight"], q) and torch.equal(t["weight_scale"].view(torch.uint8), s.view(torch.uint8))
    assert torch.equal(nvfp4.decode_nvfp4(t, shape), ck.dequantize_nvfp4(q, g, s, torch.float32))
    t, _ = mxfp8.encode_mxfp8(w)
    q, e = ck.quantize_mxfp8(w)
    assert torch.equal(t["weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(t["weight_scale"], e.view(torch.uint8))
    assert torch.equal(mxfp8.decode_mxfp8(t, shape), ck.dequantize_mxfp8(q, e, torch.float32))
    for per_row, reference in ((True, ck.quantize_int8_rowwise), (False, ck.quantize_int8_tensorwise)):
        t, _ = int8.encode_int8(w, per_row=per_row, convrot=False)
        q, s = reference(w)
        assert torch.equal(t["weight"], q) and torch.equal(t["weight_scale"], s) and t["weight_scale"].shape == s.shape
    t, conf = int8.encode_int8(w)
    q, s = torch.ops.comfy_kitchen.quantize_int8_convrot_weight(w, 256)
    assert conf == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
    assert (t["weight"] != q).float().mean() <= 1e-5 and torch.allclose(t["weight_scale"], s, rtol=1e-6)
    deq = torch.ops.comfy_kitchen.dequantize_int8_convrot_weight(t["weight"], t["weight_scale"], 256)
    assert torch.allclose(int8.decode_int8(t, shape, conf), deq, rtol=1e-5, atol=1e-6)
    t, conf = w4a4.encode_convrot_w4a4(w)
    q, s = ck.quantize_convrot_w4a4_weight(w)
    assert conf == {"format": "convrot_w4a4", "convrot_groupsize": 256}
    assert (t["weight"] != q).float().mean() <= 1e-5 and torch.allclose(t["weight_scale"], s, rtol=1e-6)
    assert torch.allclose(w4a4.decode_convrot_w4a4(t, shape, conf), ck.dequantize_convrot_w4a4_weight(q, s),
                          rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(300, 112), (36, 144), (17, 40), (5, 3)])
def test_unaligned_weights_pad_as_comfy_kitchen_pads(shape):
    """NVFP4 and MXFP8 zero-pad both dimensions (to 16, 32) when either is unaligned; decoding crops."""
    w = weight(*shape, seed=1)
    t, _ = nvfp4.encode_nvfp4(w)
    g = w.abs().amax() / 2688
    q, s = ck.quantize_nvfp4(w, g, pad_16x=True)
    assert torch.equal(t["weight"], q) and torch.equal(t["weight_scale"].view(torch.uint8), s.view(torch.uint8))
    from comfy_kitchen.tensor import QuantizedTensor, TensorCoreMXFP8Layout, TensorCoreNVFP4Layout

    params = TensorCoreNVFP4Layout.Params(scale=g, orig_dtype=torch.float32, orig_shape=shape, block_scale=s)
    assert torch.equal(nvfp4.decode_nvfp4(t, shape), QuantizedTensor(q, "TensorCoreNVFP4Layout", params).dequantize())
    t, _ = mxfp8.encode_mxfp8(w)
    q, e = ck.quantize_mxfp8(w, pad_32x=True)
    assert torch.equal(t["weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(t["weight_scale"], e.view(torch.uint8))
    params = TensorCoreMXFP8Layout.Params(scale=e, orig_dtype=torch.float32, orig_shape=shape)
    assert torch.equal(mxfp8.decode_mxfp8(t, shape), QuantizedTensor(q, "TensorCoreMXFP8Layout", params).dequantize())


def test_hadamard_and_swizzle_equal_comfy_kitchen():
    from comfy_kitchen.tensor.int8_utils import _build_hadamard

    assert torch.equal(blocks.hadamard(256), _build_hadamard(256).float())
    for rows, cols in ((300, 37), (128, 4), (5, 9)):
        s = torch.randint(0, 255, (rows, cols), dtype=torch.uint8)
        blocked = blocks.to_blocked(s)
        assert torch.equal(blocked, ck.to_blocked(s, flatten=False))
        assert torch.equal(blocks.from_blocked(blocked, rows, cols), s)


def test_guards_never_write_nan():
    zero = torch.zeros(128, 256)
    t, _ = nvfp4.encode_nvfp4(zero)
    assert not bool(t["weight"].any()) and float(t["weight_scale_2"]) == 0
    assert torch.equal(nvfp4.decode_nvfp4(t, (128, 256)), zero)
    tiny_block = torch.zeros(128, 256)
    tiny_block[0, :32] = 1e-38  # amax below 448·2^-127: E8M0 cannot hold its scale
    t, _ = mxfp8.encode_mxfp8(tiny_block)
    data = t["weight"].view(torch.uint8)
    assert not bool(data.any()) and torch.isfinite(mxfp8.decode_mxfp8(t, (128, 256))).all()
    t, _ = int8.encode_int8(zero)
    assert torch.isfinite(int8.decode_int8(t, (128, 256), {"convrot": True})).all()


# ------------------------------------------------------------------ files

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy")
    model = tiny.make_tiny(root / "m")
    out = {}
    for fmt in ("nvfp4", "mxfp8", "int8", "int8-row", "int8-tensor", "convrot-w4a4"):
        path = root / f"{fmt}.safetensors"
        from qconvert.formats.comfyui import writer as comfy

        source = open_checkpoint(model)
        comfy.convert(source, path, comfy.make_options(fmt), quiet=True)
        out[fmt] = path
    return model, out


STORAGE = {"nvfp4": torch.uint8, "mxfp8": torch.float8_e4m3fn, "int8_tensorwise": torch.int8,
           "convrot_w4a4": torch.int8}


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8", "int8", "int8-row", "int8-tensor", "convrot-w4a4"])
def test_files_load_as_comfyui_loads_them(files, fmt):
    """The loader's steps (spec §8.3): parse each comfy_quant, check the storage dtype, build comfy-kitchen's
    layout params as _load_quantized_module does, dequantize; plus qconvert's own loader for verify."""
    from comfy_kitchen.tensor import (
        QuantizedTensor,
        TensorCoreConvRotW4A4Layout,
        TensorCoreMXFP8Layout,
        TensorCoreNVFP4Layout,
        TensorWiseINT8Layout,
    )

    model, paths = files
    tensors = load_file(paths[fmt])
    source = open_checkpoint(model)
    layers = sorted(k[: -len(".comfy_quant")] for k in tensors if k.endswith(".comfy_quant"))
    linears = sorted({qi.describe(n).module for n in source.tensors if qi.describe(n).is_block_linear})
    expected = linears if fmt.startswith("int8") else [m for m in linears if m != "transformer_blocks.0.img_mod.1"]
    assert layers == expected  # comfy-quants' policy: 839 of 840 at full size, all 840 for INT8
    ours = FP8File(paths[fmt])
    for layer in layers:
        conf = json.loads(tensors[f"{layer}.comfy_quant"].numpy().tobytes())
        fmt_name = conf["format"]
        q = tensors[f"{layer}.weight"]
        assert q.dtype == STORAGE[fmt_name]
        src = source.load(f"{layer}.weight").float()
        shape = tuple(src.shape)
        if fmt_name == "nvfp4":
            params = TensorCoreNVFP4Layout.Params(scale=tensors[f"{layer}.weight_scale_2"], orig_dtype=torch.bfloat16,
                                                  orig_shape=shape,
                                                  block_scale=tensors[f"{layer}.weight_scale"].view(torch.float8_e4m3fn))
            qt = QuantizedTensor(q, "TensorCoreNVFP4Layout", params)
        elif fmt_name == "mxfp8":
            params = TensorCoreMXFP8Layout.Params(scale=tensors[f"{layer}.weight_scale"].view(torch.float8_e8m0fnu),
                                                  orig_dtype=torch.bfloat16, orig_shape=shape)
            qt = QuantizedTensor(q, "TensorCoreMXFP8Layout", params)
        elif fmt_name == "convrot_w4a4":
            params = TensorCoreConvRotW4A4Layout.Params(scale=tensors[f"{layer}.weight_scale"],
                                                        orig_dtype=torch.bfloat16, orig_shape=shape,
                                                        convrot_groupsize=conf["convrot_groupsize"])
            qt = QuantizedTensor(q, "TensorCoreConvRotW4A4Layout", params)
        else:
            params = TensorWiseINT8Layout.Params(scale=tensors[f"{layer}.weight_scale"], orig_dtype=torch.bfloat16,
                                                 orig_shape=shape, convrot=conf.get("convrot", False),
                                                 convrot_groupsize=conf.get("convrot_groupsize", 256))
            qt = QuantizedTensor(q, "TensorWiseINT8Layout", params)
        theirs = qt.dequantize().float()
        assert theirs.shape == shape and bool(torch.isfinite(theirs).all())
        mine = ours.load(f"{layer}.weight")
        # ComfyUI dequantizes in BF16: one BF16 rounding apart at most
        assert torch.allclose(mine.to(torch.bfloat16).float(), theirs, rtol=2 ** -7, atol=1e-6), layer
        bound = {"int8-tensor": 0.5, "convrot-w4a4": 0.2}.get(fmt, 0.1)
        assert float((mine - src).norm() / src.norm()) < bound, layer
    assert not any(k.endswith("input_scale") for k in tensors)


def test_to_comfy_cli(files, tmp_path, capsys):
    model, paths = files
    code, out, err = run(["to-comfy", model, "--format", "nvfp4", "--dry-run", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["bytes"] == paths["nvfp4"].stat().st_size
    code, out, err = run(["to-comfy", model, "--format", "mxfp8", "--keep", "mod", "-o", tmp_path / "k.safetensors"],
                         capsys)
    assert code == 0 and "needs ComfyUI with mxfp8" in out, err
    header = read_safetensors_header(tmp_path / "k.safetensors")
    assert header.tensors["transformer_blocks.1.img_mod.1.weight"].dtype == "BF16"
    small = tiny.make_tiny(tmp_path / "small", layers=1, heads=2, head_dim=32, text_dim=64)
    code, out, err = run(["to-comfy", small, "--format", "int8", "-o", tmp_path / "x.safetensors"], capsys)
    assert code == 0 and "row-wise INT8 without ConvRot for 12 linears" in out, err
    code, _, err = run(["to-comfy", small, "--format", "convrot-w4a4", "-o", tmp_path / "y.safetensors"], capsys)
    assert_one_line_error(code, err, "not a multiple of 256", "convrot-w4a4")
    assert not (tmp_path / "y.safetensors").exists()


def test_verify_reads_every_format(files, tmp_path, capsys):
    model, paths = files
    figures = {}
    for fmt in ("nvfp4", "int8", "int8-tensor"):
        code, _, err = run(["verify", paths[fmt], "--reference", model, "--report", tmp_path / fmt, "--height", 32,
                            "--width", 32, "--steps", 2, "--no-decode"], capsys)
        assert code == 0, err
        figures[fmt] = json.loads((tmp_path / fmt / "report.json").read_text())
    assert figures["int8"]["format"] == "comfy-int8_tensorwise"
    # ConvRot spreads outliers across 256 inputs: far closer than one scale for the whole tensor
    assert figures["int8"]["weights"]["mean_rel_rmse"] < figures["int8-tensor"]["weights"]["mean_rel_rmse"] / 10


# -------------------------------------------------------------------- mix

def test_mix_meets_budgets_and_spends_them_on_precision(files, tmp_path, capsys):
    from qconvert.running import mix as comfy_mix

    model, _ = files
    results = {}
    for gb in ("0.0055", "0.007"):
        out = tmp_path / f"mix{gb}.safetensors"
        code, stdout, err = run(["to-comfy", model, "--format", "mix", "--target-size", gb, "-o", out, "--json",
                                 "-q"], capsys)
        assert code == 0, err
        r = json.loads(stdout)
        assert r["written"] and out.stat().st_size == r["bytes"] <= float(gb) * 1e9
        results[gb] = r["mix"]
        formats = {row["format"] for row in r["mix"]["layers"].values()}
        assert formats <= set(comfy_mix.CANDIDATES)
    assert results["0.007"]["mean_error"] < results["0.0055"]["mean_error"]
    # against the uniform files around it: smaller than INT8 (the nearest larger), closer to the source than
    # NVFP4 (the nearest smaller) in its weights; end to end: test_block_measured_mix_beats_uniform_nvfp4_...
    source = open_checkpoint(model)
    linears = comfy_mix.block_linears(source)

    def weight_error(path):
        f = FP8File(path)
        return sum(float((f.load(f"{m}.weight") - source.load(f"{m}.weight").float()).norm()
                         / source.load(f"{m}.weight").float().norm()) for m in linears) / len(linears)

    _, paths = files
    mix = tmp_path / "mix0.0055.safetensors"
    assert paths["nvfp4"].stat().st_size < mix.stat().st_size < paths["int8"].stat().st_size
    assert weight_error(mix) < weight_error(paths["nvfp4"])
    code, stdout, err = run(["to-comfy", model, "--format", "mix", "--max-error", "1e-4", "--dry-run", "--json"],
                            capsys)
    assert code == 0, err
    assert json.loads(stdout)["mix"]["mean_error"] <= 1e-4
    code, _, err = run(["to-comfy", model, "--format", "mix", "--target-size", "0.001", "-o", tmp_path / "x.st"],
                       capsys)
    assert_one_line_error(code, err, "the smallest mix")
    code, _, err = run(["to-comfy", model, "--format", "nvfp4", "--target-size", "1"], capsys)
    assert code == 2 and "--format mix" in err


def test_mix_choice_is_the_lagrangian_optimum():
    from qconvert.running.mix import choose

    errors = {"a": {"bf16": 0.0, "fp8": 1e-4, "nvfp4": 1e-2}, "b": {"bf16": 0.0, "fp8": 1e-3, "nvfp4": 2e-3}}
    sizes = {"a": {"bf16": 200, "fp8": 100, "nvfp4": 50}, "b": {"bf16": 200, "fp8": 100, "nvfp4": 50}}
    # 150 bytes: a in fp8 and b in nvfp4 (error 2.1e-3) beats a in nvfp4 and b in fp8 (1.1e-2)
    assert choose(errors, sizes, budget=150) == {"a": "fp8", "b": "nvfp4"}
    assert choose(errors, sizes, budget=250) == {"a": "fp8", "b": "fp8"}
    assert choose(errors, sizes, budget=400) == {"a": "bf16", "b": "bf16"}
    assert choose(errors, sizes, max_error=1e-3) == {"a": "fp8", "b": "fp8"}  # mean 5.5e-4; b in nvfp4: 1.05e-3
    assert choose(errors, sizes, max_error=2e-3) == {"a": "fp8", "b": "nvfp4"}


@pytest.mark.parametrize("variant", ["edit-2511", "layered"])
def test_variants_keep_their_markers_and_embeddings(tmp_path, variant):
    from qconvert.formats.comfyui import writer as comfy

    model = tiny.make_tiny(tmp_path / variant, layers=1, variant=variant)
    source = open_checkpoint(model)
    out = tmp_path / f"{variant}.safetensors"
    comfy.convert(source, out, comfy.make_options("int8"), quiet=True)
    tensors = load_file(out)
    if variant == "edit-2511":  # ComfyUI recognises Edit-2511 by this tensor only
        assert qi.MARKER_EDIT_2511 in tensors
    else:  # Layered's extra embedding stays BF16, untouched
        assert torch.equal(tensors[qi.ADDITION_T_EMBEDDING], source.load(qi.ADDITION_T_EMBEDDING).to(torch.bfloat16))
    assert FP8File(out).load("transformer_blocks.0.attn.to_q.weight").shape == (256, 256)


def test_verify_runs_the_native_matmuls(tmp_path, capsys):
    """--runtime native quantizes each layer's input as ComfyUI's FP8/FP4/INT8 matmuls do: an FP8 file without
    input_scale or the full-precision flag (qconvert's layout before the fix) saturates at ±448 there."""
    model = tiny.make_tiny(tmp_path / "m", layers=2)
    files = {}
    for mode in ("unit", "full-precision"):
        files[mode] = tmp_path / f"{mode}.safetensors"
        code, _, err = run(["to-fp8", model, "--activations", mode, "-o", files[mode], "-q"], capsys)
        assert code == 0, err
    figures = {}
    for key, path, runtime in (("unit-native", files["unit"], "native"), ("fp-native", files["full-precision"],
                               "native"), ("unit-dequantized", files["unit"], "dequantized")):
        code, _, err = run(["verify", path, "--reference", model, "--report", tmp_path / key, "--height", 32,
                            "--width", 32, "--steps", 2, "--no-decode", "--runtime", runtime], capsys)
        assert code == 0, err
        figures[key] = json.loads((tmp_path / key / "report.json").read_text())
    assert figures["unit-native"]["settings"]["runtime"] == "native"
    # the same weights: identical without activation quantization, worse with scale 1.0 on the native path
    assert figures["fp-native"]["latents"]["rel_rmse"] == figures["unit-dequantized"]["latents"]["rel_rmse"]
    assert figures["unit-native"]["latents"]["rel_rmse"] > 1.1 * figures["fp-native"]["latents"]["rel_rmse"]


def test_unrotated_int8_needs_no_rotation_group(tmp_path):
    """An int8 layer without ConvRot has no group to fit: 128-input layers load (they were refused)."""
    from qconvert.formats.comfyui import writer as comfy

    model = tiny.make_tiny(tmp_path / "m", layers=1, heads=2, head_dim=64, text_dim=64)
    out = tmp_path / "row.safetensors"
    comfy.convert(open_checkpoint(model), out, comfy.make_options("int8-row"), quiet=True)
    assert FP8File(out).load("transformer_blocks.0.attn.to_q.weight").shape == (128, 128)


def test_unaligned_model_round_trips_through_comfyui(tmp_path, capsys):
    """A model of width 36 (neither 16 nor 32 divides it): NVFP4 and MXFP8 store padded weights that
    comfy-kitchen's layouts, given the module's (out, in) as ComfyUI gives them, crop to what our loader reads;
    INT8 falls back to row-wise without ConvRot; dry-run sizes are exact; verify runs each file."""
    from dataclasses import replace

    from comfy_kitchen.tensor import QuantizedTensor, TensorCoreMXFP8Layout, TensorCoreNVFP4Layout

    from qconvert.formats.comfyui import writer as comfy

    # make-tiny keeps head dims to multiples of 16; ComfyUI's padding needs a width that is not
    config = replace(tiny.tiny_config(1, 1, 32, 40), attention_head_dim=36, axes_dims_rope=qi.default_axes_dims(36))
    shapes = qi.expected_shapes(config)
    model = tiny._write_diffusers(tmp_path / "m", config, {n: tiny.trained_like(n, s, 0).to(torch.bfloat16)
                                                          for n, s in shapes.items()}, 1)
    source = open_checkpoint(model)
    for fmt in ("nvfp4", "mxfp8", "int8"):
        out = tmp_path / f"{fmt}.safetensors"
        planned = comfy.convert(source, out, comfy.make_options(fmt), dry_run=True)["bytes"]
        r = comfy.convert(source, out, comfy.make_options(fmt), quiet=True)
        assert out.stat().st_size == planned
        tensors, ours = load_file(out), FP8File(out)
        layer = "transformer_blocks.0.img_mlp.net.2"  # 36 x 144
        shape = (36, 144)
        if fmt == "nvfp4":
            assert tensors[f"{layer}.weight"].shape == (48, 72)
            params = TensorCoreNVFP4Layout.Params(scale=tensors[f"{layer}.weight_scale_2"], orig_dtype=torch.float32,
                                                  orig_shape=shape,
                                                  block_scale=tensors[f"{layer}.weight_scale"].view(torch.float8_e4m3fn))
            theirs = QuantizedTensor(tensors[f"{layer}.weight"], "TensorCoreNVFP4Layout", params).dequantize()
        elif fmt == "mxfp8":
            assert tensors[f"{layer}.weight"].shape == (64, 160)
            params = TensorCoreMXFP8Layout.Params(scale=tensors[f"{layer}.weight_scale"].view(torch.float8_e8m0fnu),
                                                  orig_dtype=torch.float32, orig_shape=shape)
            theirs = QuantizedTensor(tensors[f"{layer}.weight"], "TensorCoreMXFP8Layout", params).dequantize()
        else:
            assert len(r["unrotated"]) == r["layers"]
            assert json.loads(tensors[f"{layer}.comfy_quant"].numpy().tobytes()) == {"format": "int8_tensorwise"}
            theirs = tensors[f"{layer}.weight"].float() * tensors[f"{layer}.weight_scale"]
        assert torch.equal(ours.load(f"{layer}.weight"), theirs.float())
        src = source.load(f"{layer}.weight").float()
        assert float((theirs - src).norm() / src.norm()) < 0.15
        code, _, err = run(["verify", out, "--reference", model, "--report", tmp_path / fmt, "--height", 32,
                            "--width", 32, "--steps", 1, "--no-decode"], capsys)
        assert code == 0, err
    code, out, err = run(["to-comfy", model, "--format", "mix", "--max-error", "1e-3", "--dry-run", "--json"],
                         capsys)
    assert code == 0, err
    candidates = {f for row in json.loads(out)["mix"]["layers"].values() for f in row["candidates"]}
    assert "int8-row" in candidates and "int8" not in candidates  # no rotation group fits width 36


def test_block_sensitivity_sees_which_layers_matter(tmp_path):
    """The last block's text side never reaches the output; its image modulation scales the whole stream; an
    earlier block's text side is judged where it reaches the image, after the next block."""
    from qconvert.running import mix as comfy_mix
    from qconvert.running.sensitivity import block_sensitivity

    source = open_checkpoint(tiny.make_tiny(tmp_path / "m", layers=2))
    layers = comfy_mix.block_linears(source)
    table = block_sensitivity(source, layers, size=64, steps=2)
    assert set(table) == set(layers) and all(set(row) == set(comfy_mix.CANDIDATES) for row in table.values())
    last = "transformer_blocks.1."
    for dead in ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2"):
        assert all(e == 0.0 for e in table[last + dead].values()), dead
    assert table[last + "txt_mod.1"]["nvfp4"] > 0  # its first shift and scale reach the image through K and V
    in_last = [m for m in table if m.startswith(last)]
    assert max(in_last, key=lambda m: table[m]["nvfp4"]) == last + "img_mod.1"
    assert all(row["bf16"] == 0.0 for row in table.values())  # a BF16 source stored in BF16 is exact
    assert all(table["transformer_blocks.0." + text][f] > 0 for text in ("attn.to_add_out", "txt_mlp.net.2")
               for f in ("fp8", "nvfp4"))


def test_block_sensitivity_runs_several_prompts_as_one_batch(tmp_path):
    """Several seeds' prompts in one pass (each block read once) measure what one run per seed measures,
    averaged: every prompt counts alike.  (Formats whose input quantization is per row or per block; NVFP4's
    activations share one tensor-wide scale, so a batch is measured as the runtime runs that batch.)"""
    from qconvert.running.sensitivity import block_sensitivity, comfy_candidates

    source = open_checkpoint(tiny.make_tiny(tmp_path / "m", layers=2, heads=2, head_dim=32, text_dim=64))
    layers = ["transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.1.attn.to_q"]
    only = comfy_candidates("native")
    only = type(only)(("mxfp8", "fp8"), only.fitting, only.as_run)
    run = {seeds: block_sensitivity(source, layers, size=64, seeds=seeds, candidates=only, echo=lambda m: None)
           for seeds in ((3,), (4,), (3, 4))}
    for m in layers:
        for fmt in ("mxfp8", "fp8"):
            alone = (run[(3,)][m][fmt] + run[(4,)][m][fmt]) / 2
            assert run[(3,)][m][fmt] != run[(4,)][m][fmt]
            assert run[(3, 4)][m][fmt] == pytest.approx(alone, rel=1e-4), (m, fmt)


@pytest.mark.slow
def test_block_measured_mix_beats_uniform_nvfp4_end_to_end(files, tmp_path, capsys):
    """Done when (issues 13, 20): at a budget between NVFP4 and INT8, chosen for the native runtime and verified
    at verify's defaults (native) over three seeds, the mix is closer to the source than uniform NVFP4 on every
    held-out sample, its paired gain's 95% interval above zero; the file says which runtime it was chosen for."""
    from qconvert.running import stats

    model, paths = files
    nvfp4, int8 = paths["nvfp4"].stat().st_size, paths["int8"].stat().st_size
    target = (nvfp4 + (int8 - nvfp4) / 4) / 1e9
    out = tmp_path / "mix.safetensors"
    code, stdout, err = run(["to-comfy", model, "--format", "mix", "--sensitivity", "block", "--target-size",
                             target, "-o", out, "--json", "-q"], capsys)
    assert code == 0, err
    assert nvfp4 < out.stat().st_size == json.loads(stdout)["bytes"] <= target * 1e9
    assert json.loads(stdout)["mix"]["runtime"] == "native"
    with safe_open(out, "pt") as f:  # the metadata as any safetensors reader sees it
        assert json.loads(f.metadata()["qconvert"])["options"]["chosen_for_runtime"] == "native"
    reports = {}
    for name, path in (("mix", out), ("nvfp4", paths["nvfp4"])):
        code, _, err = run(["verify", path, "--reference", model, "--report", tmp_path / name, "--seeds", 3,
                            "--no-decode"], capsys)
        assert code == 0, err
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    assert reports["mix"]["settings"]["runtime"] == "native" and len(reports["mix"]["samples"]) == 6
    gain = stats.paired_gap([s["latents"]["psnr_db"] for s in reports["mix"]["samples"]],
                            [s["latents"]["psnr_db"] for s in reports["nvfp4"]["samples"]])
    assert gain["low"] > 0, gain
    code, _, err = run(["to-comfy", model, "--format", "mix", "--sensitivity", "block", "--target-size", target,
                        "--calib", tmp_path / "c.safetensors", "-o", tmp_path / "x.safetensors"], capsys)
    assert_one_line_error(code, err, "--sensitivity block")


def test_mix_runtime_choices(files, tmp_path, capsys):
    """The weight measure sees weights alone: it chooses for the dequantized runtime and says so."""
    model, _ = files
    code, out, err = run(["to-comfy", model, "--format", "mix", "--sensitivity", "weight", "--target-size", "0.006",
                          "--dry-run", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["mix"]["runtime"] == "dequantized" and json.loads(out)["mix"]["measure"] == "weight"
    code, _, err = run(["to-comfy", model, "--format", "mix", "--sensitivity", "weight", "--runtime", "native",
                        "--target-size", "0.006", "--dry-run"], capsys)
    assert_one_line_error(code, err, "--sensitivity weight", "--runtime dequantized")
    code, _, err = run(["to-comfy", model, "--format", "nvfp4", "--runtime", "native", "--dry-run"], capsys)
    assert code == 2 and "--runtime is for --format mix" in err


def test_mix_among_the_formats_a_gpu_runs_natively(files, tmp_path, capsys):
    """--candidates w4a8,int8: every layer in a format with INT8 matmuls (or BF16), recorded in the file."""
    model, _ = files
    out = tmp_path / "int8-mix.safetensors"
    code, stdout, err = run(["to-comfy", model, "--format", "mix", "--sensitivity", "weight", "--target-size", "0.006",
                             "--candidates", "w4a8,int8", "-o", out, "--json", "-q"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["mix"]["candidates"] == ["bf16", "int8", "w4a8"]
    chosen = {row["format"] for row in r["mix"]["layers"].values()}
    assert chosen <= {"bf16", "int8", "int8-row", "w4a8"} and "w4a8" in chosen
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["qconvert"])["options"]["candidates"] == ["bf16", "int8", "w4a8"]
    code, _, err = run(["to-comfy", model, "--format", "mix", "--target-size", "0.006", "--candidates", "int4"],
                       capsys)
    assert code == 2 and "--candidates int4" in err
    code, _, err = run(["to-comfy", model, "--format", "w4a8", "--candidates", "int8"], capsys)
    assert code == 2 and "--candidates is for --format mix" in err


# ------------------------------------------------------------------ FP8: bytes equal comfy-kitchen's


def test_fp8_bytes_equal_comfy_kitchen_on_bf16_trained_weights():
    """Spec §8.3: ``s = amax/M`` bit-exact, codes equal ``quantize_per_tensor_fp8(W.float(), s)``.  BF16
    sources put many ``W/s`` on an FP8 rounding tie, so dividing instead of multiplying by ``1/s`` (as
    comfy-kitchen does) shows here, while float32 random data would hide it."""
    from qconvert.codecs.comfyui.layouts.fp8 import FP8_TYPES, quantize_fp8

    ties = 0
    for name, shape in (("transformer_blocks.0.img_mod.1.weight", (1152, 192)),
                        ("transformer_blocks.0.attn.to_q.weight", (192, 192)),
                        ("transformer_blocks.1.img_mlp.net.2.weight", (192, 768)),
                        ("transformer_blocks.0.txt_mlp.net.0.proj.weight", (768, 192))):
        w = tiny.trained_like(name, shape, 0).to(torch.bfloat16)
        for fp8 in FP8_TYPES.values():
            q, s = quantize_fp8(w, fp8)
            assert float(s) == float(w.float().abs().amax() / fp8.max), name
            want = ck.quantize_per_tensor_fp8(w.float(), s, fp8.dtype)
            assert torch.equal(q.view(torch.uint8), want.view(torch.uint8)), (name, fp8.name)
            divided = (w.float() / s).clamp(-fp8.max, fp8.max).to(fp8.dtype)
            ties += int((divided.view(torch.uint8) != want.view(torch.uint8)).sum())
    assert ties > 0        # the data is the kind that tells multiplying from dividing


@pytest.mark.parametrize("args, scale_key", [(["to-fp8", "--format", "comfy"], "weight_scale"),
                                             (["to-fp8", "--format", "scaled"], "scale_weight"),
                                             (["to-comfy", "--format", "fp8"], "weight_scale")])
def test_every_fp8_writer_equals_comfy_kitchen(args, scale_key, tiny_model, tmp_path, capsys):
    command, *options = args
    out = tmp_path / "out.safetensors"
    code, _, err = run([command, tiny_model, *options, "-o", out, "-q"], capsys)
    assert code == 0, err
    source = open_checkpoint(tiny_model)
    checked = 0
    with safe_open(out, "pt") as f:
        for key in f.keys():
            q = f.get_tensor(key)
            if q.dtype != torch.float8_e4m3fn or not key.endswith(".weight"):   # "scaled_fp8": a marker
                continue
            layer = key.removesuffix(".weight")
            s = f.get_tensor(f"{layer}.{scale_key}").float().reshape(())
            want = ck.quantize_per_tensor_fp8(source.load(key).float(), s, q.dtype)
            assert torch.equal(q.view(torch.uint8), want.view(torch.uint8)), key
            checked += 1
    assert checked >= 30
