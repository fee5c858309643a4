"""qconvert to-fp8: the three layouts, their numerics, the dequantizing loader and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qconvert.core import tiny
from qconvert.core.checkpoint import DTYPES, open_checkpoint, read_safetensors_header
from qconvert.core.errors import QConvertError
from qconvert.core.io import write_safetensors
from qconvert.core.models import qwen_image as qi
from qconvert.core.pipeline import check_finite
from qconvert.formats.comfyui import fp8
from qconvert.formats.comfyui import loader as fp8_loader
from tests.cli_helpers import run

E4M3 = fp8.FP8_TYPES["e4m3fn"]
E5M2 = fp8.FP8_TYPES["e5m2"]
TOP_LINEARS = {"img_in.weight", "txt_in.weight", "time_text_embed.timestep_embedder.linear_1.weight",
               "time_text_embed.timestep_embedder.linear_2.weight", "norm_out.linear.weight", "proj_out.weight"}


def convert(model, out, **options) -> Path:
    return Path(fp8.convert(open_checkpoint(model), out, fp8.make_options(**options), quiet=True)["output"])


def read_all(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def outputs(tiny_model, tmp_path_factory):
    """The tiny model in every layout (plus e5m2 and --keep mod), converted once."""
    d = tmp_path_factory.mktemp("fp8")
    variants = {
        "comfy": {}, "comfy-e5m2": {"dtype": "e5m2"}, "scaled": {"layout": "scaled"},
        "plain": {"layout": "plain"}, "keep-mod": {"keep": ["mod"]},
    }
    return {k: convert(tiny_model, d / f"{k}.safetensors", **v) for k, v in variants.items()}


@pytest.fixture(scope="module")
def source(tiny_model):
    return load_file(str(next((tiny_model / "transformer").glob("*00001-*")))) | load_file(
        str(next((tiny_model / "transformer").glob("*00002-*"))))


def block_linears(names):
    return {n for n in names if qi.is_known(n) and qi.describe(n).is_block_linear}


# ------------------------------------------------------------------ layouts

def test_comfy_layout(outputs, source):
    tensors, metadata = read_all(outputs["comfy"])
    header = read_safetensors_header(outputs["comfy"])
    quantized = block_linears(source)
    assert len(quantized) == 42 and len(tensors) == len(source) + 2 * len(quantized)
    for name in quantized:
        layer = qi.describe(name).module
        assert header.tensors[name].dtype == "F8_E4M3" and tensors[name].shape == source[name].shape
        scale = tensors[f"{layer}.weight_scale"]
        assert scale.dtype == torch.float32 and scale.shape == ()
        assert scale == source[name].float().abs().max() / 448
        blob = tensors[f"{layer}.comfy_quant"]
        assert blob.dtype == torch.uint8 and blob.dim() == 1
        # json.dumps defaults, as ComfyUI saves it; full precision by default (ComfyUI would otherwise quantize
        # the input with scale 1.0 on FP8 GPUs and saturate it at 448: spec comfy-quant.md §2.2)
        assert blob.numpy().tobytes() == b'{"format": "float8_e4m3fn", "full_precision_matrix_mult": true}'
        assert f"{layer}.input_scale" not in tensors
    for name in set(source) - quantized:  # biases, norms, embeddings, final layers: BF16, untouched
        assert tensors[name].dtype == torch.bfloat16 and torch.equal(tensors[name], source[name]), name
    info = json.loads(metadata["qconvert"])
    assert info["tool"] == "qconvert" and info["tool_version"]
    assert info["source_fingerprint"].startswith("sha256-sampled:")
    assert info["options"]["layout"] == "comfy" and info["options"]["dtype"] == "e4m3fn"
    assert fp8_loader.fp8_layout(outputs["comfy"]) == "comfy"


@pytest.mark.parametrize("variant", ["comfy", "scaled", "plain", "comfy-e5m2"])
def test_every_tensor_is_aligned_and_readable_by_safetensors(outputs, variant):
    header = read_safetensors_header(outputs[variant])
    for meta in header.tensors.values():
        assert (meta.begin - header.data_start) % DTYPES[meta.dtype][0] == 0, meta.name
    assert len(load_file(str(outputs[variant]))) == len(header.tensors)  # the reference reader agrees


def test_scaled_layout(outputs, source):
    tensors, metadata = read_all(outputs["scaled"])
    marker = tensors["scaled_fp8"]
    assert marker.dtype == torch.float8_e4m3fn and marker.shape == (2,)  # 2 elements: no FP8 matmul
    scaled = block_linears(source) | TOP_LINEARS  # every nn.Linear weight: old ComfyUI stores all of them in FP8
    assert {n[: -len(".scale_weight")] + ".weight" for n in tensors if n.endswith(".scale_weight")} == scaled
    for name in scaled:
        s = tensors[name[: -len(".weight")] + ".scale_weight"]
        assert tensors[name].dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == ()
    assert not any(n.endswith((".comfy_quant", ".weight_scale")) for n in tensors)
    for name in set(source) - scaled:
        assert tensors[name].dtype == torch.bfloat16 and torch.equal(tensors[name], source[name]), name
    assert json.loads(metadata["qconvert"])["options"]["layout"] == "scaled"
    assert fp8_loader.fp8_layout(outputs["scaled"]) == "scaled"


def test_plain_layout_is_a_sorted_cast_without_metadata(outputs, source):
    path = outputs["plain"]
    raw = path.read_bytes()
    header_json = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert "__metadata__" not in header_json
    assert list(header_json) == sorted(source)
    offsets = [header_json[n]["data_offsets"][0] for n in header_json]
    assert offsets == sorted(offsets)  # data in name order too
    tensors, _ = read_all(path)
    for name, t in tensors.items():
        assert t.dtype == torch.float8_e4m3fn
        assert torch.equal(t, source[name].float().clamp(-448, 448).to(torch.float8_e4m3fn)), name
    assert fp8_loader.fp8_layout(path) == "plain"


def test_e5m2(outputs, source):
    tensors, _ = read_all(outputs["comfy-e5m2"])
    name = "transformer_blocks.1.img_mlp.net.2.weight"
    assert tensors[name].dtype == torch.float8_e5m2
    assert tensors["transformer_blocks.1.img_mlp.net.2.comfy_quant"].numpy().tobytes() == \
        b'{"format": "float8_e5m2", "full_precision_matrix_mult": true}'
    assert tensors["transformer_blocks.1.img_mlp.net.2.weight_scale"] == source[name].float().abs().max() / 57344


def test_keep_mod(outputs, source):
    tensors, metadata = read_all(outputs["keep-mod"])
    for name in block_linears(source):
        role = qi.describe(name).role
        kept = role in (qi.Role.IMG_MOD, qi.Role.TXT_MOD)
        assert tensors[name].dtype == (torch.bfloat16 if kept else torch.float8_e4m3fn), name
        assert (qi.describe(name).module + ".weight_scale" in tensors) is not kept
    assert json.loads(metadata["qconvert"])["options"]["keep"] == ["mod"]


def test_keep_several_groups_and_roles(tiny_model, tmp_path):
    r = fp8.convert(open_checkpoint(tiny_model), tmp_path / "k.safetensors",
                    fp8.make_options(keep=["v,mlp_down", "txt_mod"]), dry_run=True)
    kept = {n for n, t in r["tensors"].items() if t == "BF16" and qi.is_known(n) and qi.describe(n).is_block_linear}
    assert {qi.describe(n).role for n in kept} == {qi.Role.IMG_V, qi.Role.TXT_V, qi.Role.IMG_MLP_DOWN,
                                                    qi.Role.TXT_MLP_DOWN, qi.Role.TXT_MOD}
    assert r["keep"] == ["mlp_down", "txt_mod", "v"]


# ------------------------------------------------------------------ numerics

@pytest.mark.parametrize("variant,fmt", [("comfy", E4M3), ("comfy-e5m2", E5M2), ("scaled", E4M3)])
def test_round_trip_error_is_within_half_a_step(outputs, source, variant, fmt):
    """|dequantized - w| <= |w|·2^-(mantissa+1) + scale·(half the smallest subnormal), elementwise."""
    mantissa = {E4M3.name: 3, E5M2.name: 2}[fmt.name]
    tiny_sub = float(torch.finfo(fmt.dtype).smallest_normal) * 2.0 ** -mantissa
    deq = fp8_loader.load_dequantized(outputs[variant], dtype=torch.float32)
    assert set(deq) == set(source)
    stored, _ = read_all(outputs[variant])
    for name, w in source.items():
        w = w.float()
        err = (deq[name] - w).abs()
        assert torch.isfinite(deq[name]).all()
        layer = name[: -len(".weight")]
        scale = stored.get(f"{layer}.weight_scale", stored.get(f"{layer}.scale_weight"))
        if scale is None:
            assert torch.equal(deq[name], w), name  # kept BF16: exact
            continue
        bound = w.abs() * 2.0 ** -(mantissa + 1) + scale * tiny_sub / 2
        assert bool((err <= bound * (1 + 1e-6) + 1e-30).all()), (name, float((err - bound).max()))
        # The largest magnitude lands on the format's maximum.
        assert math.isclose(float(deq[name].abs().max()), float(w.abs().max()), rel_tol=1e-6)


def test_quantize_edge_cases():
    q, s = fp8.quantize_fp8(torch.zeros(4, 4, dtype=torch.bfloat16), E4M3)
    assert s == 1.0 and s.dtype == torch.float32 and s.shape == () and not q.float().any()
    # A weight below float32's normal range gets scale 1 too and rounds to zero, without NaN.
    q, s = fp8.quantize_fp8(torch.full((3,), 1e-40), E4M3)
    assert s == 1.0 and torch.equal(q.float(), torch.zeros(3))
    # Values whose w/scale overshoots the maximum by a rounding error are clamped, never NaN.
    w = torch.tensor([448.0, -448.0, 447.99997, 1e-3, 0.0, 3.0e38])
    for fmt in (E4M3, E5M2):
        q, s = fp8.quantize_fp8(w, fmt)
        assert torch.isfinite(q.float()).all() and q.float().abs().max() == fmt.max
    # The caller's tensor is not modified (the input is already float32, so no implicit copy).
    before = w.clone()
    fp8.quantize_fp8(w, E4M3)
    assert torch.equal(w, before)
    # Plain casts saturate and flush, ties to even: 2^-10 is half e4m3fn's smallest subnormal.
    plain = fp8.cast_fp8(torch.tensor([1000.0, -600.0, 1e-9, 2.0 ** -10, 3 * 2.0 ** -10]), E4M3).float()
    assert plain.tolist() == [448.0, -448.0, 0.0, 0.0, 2.0 ** -8]
    assert fp8.cast_fp8(torch.tensor([61440.0, -1e9]), E5M2).float().tolist() == [57344.0, -57344.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_found(bad):
    w = torch.randn(1000, 3).to(torch.bfloat16)
    check_finite("w", w)
    w[517, 1] = bad
    with pytest.raises(QConvertError, match="tensor w: 1 NaN/Inf"):
        check_finite("w", w)


def test_same_inputs_same_bytes(tiny_model, tmp_path, outputs):
    again = convert(tiny_model, tmp_path / "again.safetensors")
    assert again.read_bytes() == outputs["comfy"].read_bytes()


# ------------------------------------------------------------------ sizes and plans

def test_full_size_plain_is_exactly_comfy_orgs_size(full_size_sparse, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["to-fp8", full_size_sparse, "--format", "plain", "--dry-run", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["bytes"] == 20_430_635_136 and r["format"] == "plain" and r["dtype"] == "e4m3fn"
    assert len(r["tensors"]) == 1933 and set(r["tensors"].values()) == {"F8_E4M3"}
    assert r["metadata"] == {} and not r["written"]
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_full_size_comfy_plan(full_size_sparse, capsys):
    code, out, err = run(["to-fp8", full_size_sparse, "--dry-run", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["types"]["F8_E4M3"] == {"tensors": 840, "bytes": 20_384_317_440}
    assert r["types"]["BF16"]["tensors"] == 1093 and r["types"]["F32"]["tensors"] == 840
    # fp8-lora-sampler.md §3: 840 FP8 block linears + the other 46.1 M parameters in BF16.
    assert r["types"]["F8_E4M3"]["bytes"] + r["types"]["BF16"]["bytes"] == 20_476_484_736
    assert r["roles"]["img_mod"] == {"F8_E4M3": 60}
    code, out, _ = run(["to-fp8", full_size_sparse, "--dry-run", "--keep", "mod"], capsys)
    assert code == 0 and "img_mod" in out and "dry run: nothing written" in out


@pytest.mark.parametrize("variant", ["comfy", "scaled", "plain", "keep-mod"])
def test_plan_matches_the_written_file(outputs, tiny_model, variant):
    options = {"comfy": {}, "scaled": {"layout": "scaled"}, "plain": {"layout": "plain"},
               "keep-mod": {"keep": ["mod"]}}[variant]
    plan = fp8.plan_fp8(open_checkpoint(tiny_model), fp8.make_options(**options))
    header = read_safetensors_header(outputs[variant])
    assert plan.total_bytes == outputs[variant].stat().st_size
    assert {p.out_name: p.out_type for p in plan.tensors} == {n: m.dtype for n, m in header.tensors.items()}


# ------------------------------------------------------------------ markers, extras, loader

def test_edit_2511_marker(tmp_path):
    single = tiny.make_tiny_single_file(tmp_path / "edit.safetensors", layers=1, variant="edit-2511")
    folder = tiny.make_tiny(tmp_path / "edit-diffusers", layers=1, variant="edit-2511")
    for src in (single, folder):  # kept as it was, or added for a diffusers source (zero_cond_t)
        for layout in fp8.LAYOUTS:
            out = convert(src, tmp_path / f"{src.stem}-{layout}.safetensors", layout=layout)
            meta = read_safetensors_header(out).tensors[qi.MARKER_EDIT_2511]
            assert meta.shape == (0,) and meta.dtype == "BF16"
            assert qi.MARKER_EDIT_2511 not in fp8_loader.load_dequantized(out)  # a flag, not a weight


def test_loader_reads_prefixed_files_with_quantization_metadata(tmp_path):
    """ComfyUI's other description of the same layout: layer configs in __metadata__, prefixed keys."""
    w = torch.randn(8, 16)
    q, s = fp8.quantize_fp8(w, E4M3)
    p = "model.diffusion_model."
    path = tmp_path / "third-party.safetensors"
    layers = {"format_version": "1.0", "layers": {"transformer_blocks.0.attn.to_q": {"format": "float8_e4m3fn"}}}
    write_safetensors(path, {f"{p}transformer_blocks.0.attn.to_q.weight": q,
                             f"{p}transformer_blocks.0.attn.to_q.weight_scale": s,
                             f"{p}transformer_blocks.0.attn.to_q.input_scale": torch.tensor(1.0),
                             f"{p}transformer_blocks.0.attn.to_q.bias": torch.ones(8, dtype=torch.bfloat16)},
                      metadata={"_quantization_metadata": json.dumps(layers)})
    deq = fp8_loader.load_dequantized(path, dtype=torch.float32)
    assert set(deq) == {"transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_q.bias"}
    assert torch.equal(deq["transformer_blocks.0.attn.to_q.weight"], q.float() * s)


def test_loader_refuses_formats_it_cannot_dequantize(tmp_path):
    path = tmp_path / "unknown.safetensors"  # not stock ComfyUI's
    write_safetensors(path, {"a.weight": torch.zeros(4, 8, dtype=torch.int8), "a.weight_scale": torch.ones(4),
                             "a.comfy_quant": torch.tensor(list(b'{"format": "svdquant_w4a4"}'), dtype=torch.uint8)})
    with pytest.raises(QConvertError, match="layer a uses comfy_quant format 'svdquant_w4a4'"):
        fp8_loader.load_dequantized(path)
    path = tmp_path / "w4a8.safetensors"  # a format it reads, missing the tensors it needs
    write_safetensors(path, {"a.weight": torch.zeros(4, 8, dtype=torch.int8), "a.weight_scale": torch.ones(4),
                             "a.comfy_quant": torch.tensor(list(b'{"format": "asym_w4a8_int8"}'), dtype=torch.uint8)})
    with pytest.raises(QConvertError, match="layer a is asym_w4a8_int8 but lacks weight, weight_s_rel"):
        fp8_loader.load_dequantized(path)
    path = tmp_path / "nvfp4.safetensors"  # a block format with a scale grid that does not fit its weight
    write_safetensors(path, {"a.weight": torch.zeros(4, 8, dtype=torch.uint8), "a.weight_scale": torch.ones(()),
                             "a.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)})
    with pytest.raises(QConvertError, match="weight_scale is F32 .* needs an 8-bit"):
        fp8_loader.load_dequantized(path)


def test_extra_tensors_pass_through(tiny_single_file, tmp_path):
    tensors = load_file(str(tiny_single_file))
    tensors["my_custom.buffer"] = torch.arange(6, dtype=torch.float32) / 7
    src = tmp_path / "extra.safetensors"
    write_safetensors(src, tensors)
    fp8.convert(open_checkpoint(src, allow_extra=True), tmp_path / "o.safetensors", quiet=True)
    assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["my_custom.buffer"], tensors["my_custom.buffer"])


# ------------------------------------------------------------------ command line

def test_cli_default_name_text_and_json(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["to-fp8", tiny_model], capsys)
    assert code == 0, err
    assert (tmp_path / "tiny-qwen-image-fp8mixed-e4m3fn.safetensors").is_file()
    assert "F8_E4M3 3" in out and "diffusion_models" in out and "load_dequantized" in out
    (tmp_path / "sub").mkdir()
    code, out, err = run(["to-fp8", tiny_model, "--format", "scaled", "-o", tmp_path / "sub", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["output"] == str(tmp_path / "sub" / "tiny-qwen-image-fp8-e4m3fn-scaled.safetensors") and r["written"]
    assert r["bytes"] == (tmp_path / "sub" / "tiny-qwen-image-fp8-e4m3fn-scaled.safetensors").stat().st_size


@pytest.mark.parametrize("args,pattern", [
    (["--keep", "bogus"], "unknown group(s) bogus; valid groups are attn, attn_out"),
    (["--keep", "mod", "--format", "plain"], "--keep needs --format comfy"),
    (["--format", "scaled", "--dtype", "e5m2"], "supports only --dtype e4m3fn"),
    (["--format", "fp4"], "Invalid value for '--format'"),
])
def test_cli_usage_errors(tiny_model, capsys, args, pattern):
    code, _, err = run(["to-fp8", tiny_model, "--dry-run", *args], capsys)
    assert code == 2 and pattern in err, err


def test_cli_bad_output_name(tiny_model, tmp_path, capsys):
    code, _, err = run(["to-fp8", tiny_model, "-o", tmp_path / "x.pt"], capsys)
    assert code == 1 and "give the output a .safetensors name" in err


def test_nan_in_the_source_fails_and_leaves_nothing(tiny_single_file, tmp_path, capsys):
    tensors = load_file(str(tiny_single_file))
    bad = "transformer_blocks.1.attn.to_k.weight"
    tensors[bad][3, 5] = float("nan")
    src = tmp_path / "src" / "broken.safetensors"
    write_safetensors(src, tensors)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(["to-fp8", src, "-o", out / "x.safetensors"], capsys)
    assert code == 1 and f"tensor {bad}: 1 NaN/Inf" in err and len(err.strip().splitlines()) == 1
    assert list(out.iterdir()) == []  # no output, no temporary left behind


def test_lora_is_merged_before_quantizing(tiny_model, tmp_path, capsys):
    pytest.importorskip("qconvert.core.lora", reason="the LoRA view (qconvert/core/lora.py) is not installed")
    target = "transformer_blocks.0.attn.to_q"
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(4, 256, generator=g) * 0.1, torch.randn(256, 4, generator=g) * 0.1
    lora = tmp_path / "style.safetensors"
    write_safetensors(lora, {f"{target}.lora_A.weight": down, f"{target}.lora_B.weight": up,
                             f"{target}.alpha": torch.tensor(2.0)})
    args = ["to-fp8", tiny_model, "--lora", f"{lora}:0.5", "-o", tmp_path / "o.safetensors", "--json"]
    code, out, err = run([*args, "--dry-run"], capsys)
    assert code == 0, err
    planned = json.loads(out)["bytes"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert (tmp_path / "o.safetensors").stat().st_size == planned == json.loads(out)["bytes"]
    tensors, metadata = read_all(tmp_path / "o.safetensors")
    w = open_checkpoint(tiny_model).load(f"{target}.weight")
    merged = (w.float() + 0.5 * (2.0 / 4) * (up @ down)).to(torch.bfloat16)  # strength · alpha/rank, rounded once
    q, s = fp8.quantize_fp8(merged, E4M3)
    assert torch.equal(tensors[f"{target}.weight"].view(torch.uint8), q.view(torch.uint8))
    assert tensors[f"{target}.weight_scale"] == s
    assert json.loads(metadata["qconvert"])["loras"], "LoRAs are part of the provenance"


def test_demo_step(tiny_model, tmp_path):
    lines = []
    from qconvert.converters import fp8 as fp8_converter

    written = fp8_converter.demo_step(tiny_model, tmp_path, True, lines.append)
    assert [p.name for p in written] == ["tiny-qwen-image-fp8mixed-e4m3fn.safetensors"]
    assert any("diffusion_models" in line for line in lines) and any("load_dequantized" in line for line in lines)


# ------------------------------------------------------------------ diffusers oracle

@pytest.mark.oracle
def test_dequantized_weights_run_in_diffusers(tiny_model, outputs):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference QwenImageTransformer2DModel")
    model_cls = diffusers.QwenImageTransformer2DModel
    ref = model_cls.from_pretrained(tiny_model, subfolder="transformer", torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    h = w = 8
    inputs = dict(hidden_states=torch.randn(1, h * w, ref.config.in_channels, generator=g),
                  encoder_hidden_states=torch.randn(1, 12, ref.config.joint_attention_dim, generator=g),
                  encoder_hidden_states_mask=torch.ones(1, 12, dtype=torch.long),
                  timestep=torch.tensor([0.7]), img_shapes=[(1, h, w)], return_dict=False)

    def output(model):
        with torch.no_grad():
            return model(**inputs)[0]

    expected = output(ref)
    errors = {}
    for variant in ("comfy", "comfy-e5m2", "keep-mod", "scaled", "plain"):
        weights = fp8_loader.load_dequantized(outputs[variant], dtype=torch.float32)
        if variant == "comfy":  # the documented diffusers path: the dequantizing loader feeding from_single_file
            model = model_cls.from_single_file(weights, config=str(tiny_model), subfolder="transformer",
                                               torch_dtype=torch.float32)
        else:
            model = ref
            model.load_state_dict(weights, strict=True)
        got = output(model)
        errors[variant] = float((got - expected).norm() / expected.norm())
        assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.99, variant
    assert errors["comfy"] < 0.08, errors
    assert errors["keep-mod"] < errors["comfy"] < errors["comfy-e5m2"] < 0.16, errors
    assert errors["scaled"] < 0.16 and errors["plain"] < 0.16, errors


def test_inspect_names_each_layout(outputs, tmp_path):
    from qconvert.formats.inspection import inspect_path

    assert "comfy_quant" in inspect_path(outputs["comfy"])["format"]
    assert "legacy scaled fp8" in inspect_path(outputs["scaled"])["format"]
    assert "plain fp8 cast" in inspect_path(outputs["plain"])["format"]
    # Edit-2511's empty marker stays BF16 in a plain file; it must not hide the layout.
    edit = tiny.make_tiny_single_file(tmp_path / "e.safetensors", layers=1, variant="edit-2511")
    summary = inspect_path(convert(edit, tmp_path / "ep.safetensors", layout="plain"))
    assert "plain fp8 cast" in summary["format"] and summary["variant"] == "qwen-image-edit-2511"


# ----------------------------------------------------- activation modes

def test_fp8_matmuls_are_judged_on_prompts_the_calibration_did_not_see(tmp_path):
    from qconvert.converters.fp8 import held_out_seeds
    from qconvert.formats.calibration import Stat, write_calibration

    def calibration(seed, prompts):
        path = tmp_path / f"c{seed}-{prompts}.safetensors"
        meta = {"qconvert": json.dumps({"format": "calibration", "options": {"seed": seed, "prompts": prompts}})}
        write_calibration(path, {"x": Stat(torch.ones(4, dtype=torch.float64), torch.ones(4), torch.zeros(1, 4), 1)},
                          meta)
        return path

    assert held_out_seeds(calibration(0, 8)) == (1000, 1001)
    assert held_out_seeds(calibration(999, 4)) == (1003, 1004)
    assert held_out_seeds(calibration(2000, 4)) == (1000, 1001)


def test_activation_modes(tmp_path, capsys):
    """calibrated: each layer's FP8 matmul measured as the native runtime computes it; the layers it would cost
    too much keep full precision, and the file verifies at the native runtime far closer than one that puts
    every layer on an FP8 matmul."""
    from qconvert.formats.calibration import read_stats
    from qconvert.running import stats as figures
    from tests.cli_helpers import run

    model = tiny.make_tiny(tmp_path / "m", layers=2)
    calib = tmp_path / "calib.safetensors"
    code, out, err = run(["calibrate", model, "--synthetic", "1", "--height", 128, "--width", 128, "--steps", 2,
                          "-o", calib], capsys)
    assert code == 0 and "saw inputs beyond ±448" in out, err
    paths, reports = {}, {}
    for mode, extra in (("unit", []), ("calibrated", ["--calib", calib, "--margin", "1.5"]),
                        ("every-fp8-matmul", ["--calib", calib, "--margin", "1.5", "--input-tolerance", "1000"])):
        paths[mode] = tmp_path / f"{mode}.safetensors"
        activations = "unit" if mode == "unit" else "calibrated"
        code, out, err = run(["to-fp8", model, "--activations", activations, *extra, "-o", paths[mode], "--json",
                              "-q"], capsys)
        assert code == 0, err
        reports[mode] = json.loads(out)
    unit = load_file(paths["unit"])
    layer = "transformer_blocks.1.attn.to_q"
    assert unit[f"{layer}.comfy_quant"].numpy().tobytes() == b'{"format": "float8_e4m3fn"}'
    # unmeasured, img_mlp.net.2 keeps full precision (sglang's ablation); calibrated measures it instead
    assert json.loads(unit["transformer_blocks.1.img_mlp.net.2.comfy_quant"].numpy().tobytes()) == {
        "format": "float8_e4m3fn", "full_precision_matrix_mult": True}
    recorded = json.loads(read_safetensors_header(paths["unit"]).metadata["qconvert"])["options"]
    assert recorded["full_precision_layers"] == ["img_mlp.net.2"]
    calibrated = load_file(paths["calibrated"])
    measured = reports["calibrated"]["fp8_matmul"]
    assert measured["runtime"] == "native" and measured["tolerance"] == 2.0
    assert measured["held_out_seeds"] == [1000, 1001]  # the calibration drew seed 0 only
    source = open_checkpoint(model)
    layers = sorted({qi.describe(n).module for n in block_linears(source.tensors)})
    stats = read_stats(calib, source, layers)
    kept = set(measured["full_precision"])
    assert 0 < len(kept) < len(layers)
    for name in layers:
        conf = json.loads(calibrated[f"{name}.comfy_quant"].numpy().tobytes())
        errors = measured["errors"][name]
        if name in kept:
            assert conf["full_precision_matrix_mult"] is True and f"{name}.input_scale" not in calibrated
            assert errors["fp8_matmul"] > 3 * errors["full_precision"]
        else:
            assert conf == {"format": "float8_e4m3fn"} and errors["fp8_matmul"] <= 3 * errors["full_precision"]
            amax = float(stats[name].absmax.max())
            assert float(calibrated[f"{name}.input_scale"]) == pytest.approx(1.5 * amax / 448, rel=1e-6)
    assert reports["every-fp8-matmul"]["fp8_matmul"]["full_precision"] == []
    psnr = {}
    for mode in ("calibrated", "every-fp8-matmul"):
        code, _, err = run(["verify", paths[mode], "--reference", model, "--report", tmp_path / mode, "--no-decode"],
                           capsys)  # at verify's defaults
        assert code == 0, err  # the loader reads input_scale beside the weights
        psnr[mode] = [s["latents"]["psnr_db"] for s in
                      json.loads((tmp_path / mode / "report.json").read_text())["samples"]]
    assert figures.paired_gap(psnr["calibrated"], psnr["every-fp8-matmul"])["low"] > 0
    with safe_open(paths["calibrated"], "pt") as f:
        options = json.loads(f.metadata()["qconvert"])["options"]
    assert options["chosen_for_runtime"] == "native" and options["full_precision_layers"] == len(kept)
    code, _, err = run(["to-fp8", model, "--activations", "calibrated", "-o", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "--calib" in err
    code, _, err = run(["to-fp8", model, "--format", "plain", "--activations", "unit", "-o",
                        tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "needs --format comfy" in err
