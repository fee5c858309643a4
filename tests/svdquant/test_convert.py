"""to-svdquant end to end: the spec's key table, diffusers' own module definitions, verify, LoRA, bad input."""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import shutil
import sys
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qconvert.converters.svdquant import SvdqOptions, plan_entries
from qconvert.core import tiny
from qconvert.core.checkpoint import open_checkpoint
from qconvert.formats.svdquant.file import SVDQuantFile
from tests.cli_helpers import assert_one_line_error

FAST = ["--rank", "16", "--grid", "3"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.make_tiny(tmp_path_factory.mktemp("svdq") / "m")


@pytest.fixture(scope="module")
def calib(tmp_path_factory, model, ):
    path = tmp_path_factory.mktemp("calib") / "calib.safetensors"
    code, _, err = run_cli(["calibrate", model, "--synthetic", "1", "--height", "128", "--width", "128",
                            "--steps", "2", "-o", path])
    assert code == 0, err
    return path


def run_cli(args):
    """``qconvert ARGS`` in this process through main() (its one-line errors): (code, stdout, stderr)."""
    import contextlib
    import io

    from qconvert.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, model, calib):
    root = tmp_path_factory.mktemp("outs")
    paths = {}
    for layout in ("nunchaku", "diffusers"):
        for precision in ("int4", "nvfp4"):
            out = root / (f"{layout}-{precision}" + (".safetensors" if layout == "nunchaku" else ""))
            code, _, err = run_cli(["to-svdquant", model, "--precision", precision, "--layout", layout, "--calib",
                                    calib, *FAST, "-o", out, "-q"])
            assert code == 0, err
            paths[layout, precision] = out
    return paths


# ------------------------------------------------------ the spec's tables

SPEC_BLOCK0_INT4_R128 = {  # svdquant.md §3.4, full-size Qwen-Image (D 3072, F 12288)
    "attn.to_qkv.qweight": ("I8", (9216, 1536)), "attn.to_qkv.wscales": ("BF16", (48, 9216)),
    "attn.to_qkv.smooth_factor": ("BF16", (3072,)), "attn.to_qkv.smooth_factor_orig": ("BF16", (3072,)),
    "attn.to_qkv.proj_down": ("BF16", (3072, 128)), "attn.to_qkv.proj_up": ("BF16", (9216, 128)),
    "attn.to_qkv.bias": ("BF16", (9216,)), "attn.add_qkv_proj.qweight": ("I8", (9216, 1536)),
    "attn.to_out.0.qweight": ("I8", (3072, 1536)), "attn.to_add_out.wscales": ("BF16", (48, 3072)),
    "img_mlp.net.0.proj.qweight": ("I8", (12288, 1536)), "img_mlp.net.0.proj.proj_up": ("BF16", (12288, 128)),
    "img_mlp.net.2.qweight": ("I8", (3072, 6144)), "img_mlp.net.2.wscales": ("BF16", (192, 3072)),
    "img_mlp.net.2.smooth_factor": ("BF16", (12288,)), "img_mlp.net.2.proj_down": ("BF16", (12288, 128)),
    "txt_mlp.net.2.bias": ("BF16", (3072,)),
    "img_mod.1.qweight": ("I32", (4608, 1536)), "img_mod.1.wscales": ("BF16", (48, 18432)),
    "img_mod.1.wzeros": ("BF16", (48, 18432)), "img_mod.1.bias": ("BF16", (18432,)),
    "txt_mod.1.qweight": ("I32", (4608, 1536)), "attn.norm_q.weight": ("BF16", (128,)),
}
SPEC_BLOCK0_FP4_R32 = {
    "attn.to_qkv.qweight": ("I8", (9216, 1536)), "attn.to_qkv.wscales": ("F8_E4M3", (192, 9216)),
    "attn.to_qkv.wcscales": ("BF16", (9216,)), "attn.to_qkv.proj_down": ("BF16", (3072, 32)),
    "attn.to_out.0.wscales": ("F8_E4M3", (192, 3072)), "attn.to_out.0.wtscale": ("BF16", (1,)),
    "img_mlp.net.2.wscales": ("F8_E4M3", (768, 3072)), "img_mod.1.qweight": ("I32", (4608, 1536)),
}


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    return open_checkpoint(tiny.make_full_size_sparse(tmp_path_factory.mktemp("full") / "q"))


@pytest.mark.parametrize("precision, rank, table", [("int4", 128, SPEC_BLOCK0_INT4_R128),
                                                    ("nvfp4", 32, SPEC_BLOCK0_FP4_R32)])
def test_full_size_keys_are_the_specs(full_size, precision, rank, table):
    entries = {n: (d, tuple(s)) for n, d, s in plan_entries(full_size, SvdqOptions(precision, rank))}
    block0 = {n[len("transformer_blocks.0."):]: v for n, v in entries.items() if n.startswith("transformer_blocks.0.")}
    for key, want in table.items():
        assert block0[key] == want, key
    # 8 W4A4 modules of 7 tensors (+ α for NVFP4), 2 AWQ modules of 4, 4 norms
    assert len(block0) == 8 * (7 if precision == "int4" else 8) + 2 * 4 + 4
    # no wcscales in INT4 files; every float BF16 but FP4's micro-scales; one global rank
    assert not any(k.endswith("wcscales") for k in block0) or precision == "nvfp4"
    assert all(d in ("BF16", "I8", "I32", "F8_E4M3") for d, _ in entries.values())
    assert {s[1] for n, (d, s) in entries.items() if n.endswith(("proj_down", "proj_up"))} == {rank}
    top = {n for n in entries if not n.startswith("transformer_blocks.")}
    assert top == {"img_in.weight", "img_in.bias", "txt_norm.weight", "txt_in.weight", "txt_in.bias",
                   "norm_out.linear.weight", "norm_out.linear.bias", "proj_out.weight", "proj_out.bias",
                   *(f"time_text_embed.timestep_embedder.linear_{i}.{k}" for i in (1, 2) for k in ("weight", "bias"))}
    assert sum(1 for n in entries if n.endswith(".qweight")) == 60 * 10


def test_nunchaku_metadata(outputs, model):
    with safe_open(outputs["nunchaku", "int4"], "pt") as f:
        meta = f.metadata()
    assert meta["model_class"] == "NunchakuQwenImageTransformer2DModel" and meta["comfy_config"] == "{}"
    q = json.loads(meta["quantization_config"])
    assert q == {"method": "svdquant", "rank": 16, "weight": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
                 "activation": {"dtype": "int4", "scale_dtype": None, "group_size": 64}}
    assert json.loads(meta["config"]) == json.loads((model / "transformer" / "config.json").read_text())
    with safe_open(outputs["nunchaku", "nvfp4"], "pt") as f:
        q = json.loads(f.metadata()["quantization_config"])
    assert q["weight"] == {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16}


# ------------------------------------------- diffusers' module definitions

@pytest.fixture(scope="module")
def nunchaku_lite():
    """diffusers' quantizers/nunchaku module, with a stand-in for kernels.get_kernel (only forward uses it)."""
    diffusers = pytest.importorskip("diffusers")
    model_class = diffusers.QwenImageTransformer2DModel  # resolve the lazy import before the stand-in
    import diffusers.utils as du
    import diffusers.utils.constants as dc

    saved = (du.is_kernels_available, getattr(du, "is_kernels_version", None), dc.DIFFUSERS_TRUST_REMOTE_KERNELS)
    fake = types.ModuleType("kernels")
    fake.__spec__ = importlib.machinery.ModuleSpec("kernels", None)
    fake.get_kernel = lambda *a, **k: types.SimpleNamespace(ops=None)
    sys.modules["kernels"] = fake
    du.is_kernels_available, du.is_kernels_version = (lambda: True), (lambda *a: True)
    dc.DIFFUSERS_TRUST_REMOTE_KERNELS = True
    try:
        sys.modules.pop("diffusers.quantizers.nunchaku.utils", None)
        yield importlib.import_module("diffusers.quantizers.nunchaku.utils"), model_class
    finally:
        del sys.modules["kernels"]
        sys.modules.pop("diffusers.quantizers.nunchaku.utils", None)
        du.is_kernels_available, du.is_kernels_version, dc.DIFFUSERS_TRUST_REMOTE_KERNELS = saved


@pytest.mark.oracle
@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_diffusers_layout_matches_diffusers_modules(outputs, nunchaku_lite, precision):
    utils, model_class = nunchaku_lite
    folder = outputs["diffusers", precision]
    config = json.loads((folder / "config.json").read_text())
    q = config.pop("quantization_config")
    model = model_class.from_config(config).to(torch.bfloat16)
    replaced = utils.replace_with_nunchaku_linear(model, q, torch.bfloat16)
    assert replaced == 3 * 14  # every linear of every block: 12 W4A4, 2 AWQ
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    utils.check_strict_state_dict_match(model, state)  # diffusers' own strict matcher
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        assert (params[name].dtype, tuple(params[name].shape)) == (tensor.dtype, tuple(tensor.shape)), name


# ------------------------------------------------------------------ verify

def verify(output, model, report):
    code, out, err = run_cli(["verify", output, "--reference", model, "--report", report, "--height", 64,
                              "--width", 64, "--steps", 2, "--no-decode"])
    assert code == 0, err
    return json.loads((report / "report.json").read_text())


@pytest.mark.parametrize("value", [float("nan"), 0.0])
def test_damaged_smoothing_fails_verify_naming_the_layer(outputs, model, tmp_path, value):
    """NaN or zero smoothing factors (the kernels divide by them): verify exits 1 naming them; no NaN figure is
    written."""
    from qconvert.core.io import write_safetensors

    with safe_open(outputs["nunchaku", "int4"], "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    key = "transformer_blocks.1.attn.to_qkv.smooth_factor"
    state[key] = torch.full_like(state[key], value)
    damaged = tmp_path / "damaged.safetensors"
    write_safetensors(damaged, state, meta)
    report = tmp_path / "report"
    code, _, err = run_cli(["verify", damaged, "--reference", model, "--report", report, "--height", 64, "--width",
                            64, "--steps", 2, "--no-decode"])
    assert_one_line_error(code, err, "transformer_blocks.1.attn.to_qkv.smooth_factor", "zero, negative or non-finite")
    assert not report.exists()


def test_verify_runs_every_layout_and_ranks_them(outputs, model, calib, tmp_path):
    reports = {key: verify(path, model, tmp_path / "-".join(key)) for key, path in outputs.items()}
    for key, r in reports.items():
        assert r["format"].startswith(f"svdquant-{key[0]}-{key[1]}") and r["latents"]["psnr_db"] > 20, key
    # same search, two layouts: the same effective W4A4 weights (Nunchaku's modulation bias differs: its +1
    # is rounded to BF16 with the bias, as the real format stores it)
    def w4a4(r):
        return {row["name"]: row["rel_rmse"] for row in r["per_layer"]
                if row["name"].endswith(".weight") and ("attn." in row["name"] or "_mlp." in row["name"])}
    nk, df = w4a4(reports["nunchaku", "nvfp4"]), w4a4(reports["diffusers", "nvfp4"])
    assert nk.keys() == df.keys() and all(nk[k] == pytest.approx(df[k], rel=1e-3, abs=1e-6) for k in nk)
    hi = tmp_path / "r64.safetensors"
    code, _, err = run_cli(["to-svdquant", model, "--calib", calib, "--rank", "64", "--grid", "3", "-o", hi, "-q"])
    assert code == 0, err
    r64 = verify(hi, model, tmp_path / "r64")
    assert r64["weights"]["mean_rel_rmse"] < reports["nunchaku", "int4"]["weights"]["mean_rel_rmse"]


def test_dry_run_size_is_exact_and_output_deterministic(model, calib, outputs, tmp_path):
    code, out, err = run_cli(["to-svdquant", model, "--calib", calib, *FAST, "--dry-run", "--json"])
    assert code == 0, err
    planned = json.loads(out)
    assert planned["bytes"] == outputs["nunchaku", "int4"].stat().st_size and planned["written"] is False
    again = tmp_path / "again.safetensors"
    code, _, err = run_cli(["to-svdquant", model, "--calib", calib, *FAST, "-o", again, "-q"])
    assert code == 0, err
    assert again.read_bytes() == outputs["nunchaku", "int4"].read_bytes()


# -------------------------------------------------------------------- LoRA

def tensors(path):
    return load_file(path)


def test_lora_strength_zero_changes_nothing_and_bake_equals_merge_then_quantize(model, calib, outputs, tmp_path):
    lora = tiny.make_tiny_lora(tmp_path / "l.safetensors", model)
    zero = tmp_path / "zero.safetensors"
    code, _, err = run_cli(["to-svdquant", model, "--calib", calib, *FAST, "--lora", f"{lora}:0", "-o", zero, "-q"])
    assert code == 0, err
    base = tensors(outputs["nunchaku", "int4"])
    assert all(torch.equal(v, base[k]) for k, v in tensors(zero).items())
    merged = tmp_path / "merged"
    code, _, err = run_cli(["bake-lora", model, "--lora", lora, "-o", merged, "-q"])
    assert code == 0, err
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run_cli(["to-svdquant", model, "--calib", calib, *FAST, "--lora", lora, "-o", a, "-q"])[0] == 0
    assert run_cli(["to-svdquant", merged, "--calib", calib, *FAST, "-o", b, "-q"])[0] == 0
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(v, base[k]) for k, v in ta.items())


# --------------------------------------------------------------- bad input

def test_bad_inputs_are_one_line(model, calib, tmp_path):
    other = tiny.make_tiny(tmp_path / "other", layers=2, heads=3, head_dim=128, text_dim=128)
    cases = [
        (["to-svdquant", other, "--calib", calib], "calib.safetensors", "another model"),
        (["to-svdquant", model, "--rank", "24"], "--rank 24", "multiple of 16"),
        (["to-svdquant", model, "--rank", "512"], "--rank 512"),
        (["to-svdquant", tiny.make_tiny(tmp_path / "lay", variant="layered")], "Layered"),
    ]
    for args, *patterns in cases:
        code, _, err = run_cli([*args, "-o", tmp_path / "x.safetensors"])
        assert_one_line_error(code, err, *patterns)
        assert not (tmp_path / "x.safetensors").exists()


def test_an_already_quantized_input_is_refused(outputs, tmp_path):
    code, _, err = run_cli(["to-svdquant", outputs["nunchaku", "int4"], "-o", tmp_path / "x.safetensors"])
    assert_one_line_error(code, err, "SVDQuant", "already quantized")


def test_hostile_svdquant_files_are_one_line(outputs, tmp_path):
    from qconvert.core.errors import CheckpointError
    from qconvert.core.io import write_safetensors

    with safe_open(outputs["nunchaku", "int4"], "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    state.pop("transformer_blocks.1.attn.to_qkv.proj_up")
    broken = tmp_path / "broken.safetensors"
    write_safetensors(broken, state, meta)
    with pytest.raises(CheckpointError, match="proj_up is missing"):
        SVDQuantFile(broken)
    bad_meta = tmp_path / "meta.safetensors"
    write_safetensors(bad_meta, {"x": torch.zeros(1)}, {**meta, "quantization_config": '{"weight": {"dtype": "q"}}'})
    with pytest.raises(CheckpointError, match="neither int4 nor fp4"):
        SVDQuantFile(bad_meta)
    # metadata that contradicts the tensors (the kernels would read them in groups of 0) is refused
    q = json.loads(meta["quantization_config"])
    q["weight"]["group_size"] = 0
    group = tmp_path / "group.safetensors"
    with safe_open(outputs["nunchaku", "int4"], "pt") as f:
        write_safetensors(group, {k: f.get_tensor(k) for k in f.keys()}, {**meta, "quantization_config": json.dumps(q)})
    with pytest.raises(CheckpointError, match="weight group_size 0 disagrees with the tensors"):
        SVDQuantFile(group)
    folder = outputs["diffusers", "int4"]
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["svdq_w4a4"]["group_size"] = 0
    copy = tmp_path / "diffusers-group"
    shutil.copytree(folder, copy)
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="svdq_w4a4 group_size 0 disagrees with the tensors"):
        SVDQuantFile(copy)


def effective(path, name):
    f = SVDQuantFile(path)
    try:
        return f.load(name)
    finally:
        f.close()


def test_lowrank_mode_appends_the_lora_exactly(model, calib, outputs, tmp_path):
    lora = tiny.make_tiny_lora(tmp_path / "l.safetensors", model)
    out = tmp_path / "lowrank.safetensors"
    code, _, err = run_cli(["to-svdquant", model, "--calib", calib, *FAST, "--lora", lora, "--lora-mode",
                            "lowrank", "-o", out, "-q"])
    assert code == 0, err
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["quantization_config"])["rank"] == 32  # 16 + q/k/v's 3 x 4, padded
    from qconvert.core.lora import with_loras

    view = with_loras(open_checkpoint(model), [lora])
    for name in ("transformer_blocks.1.attn.to_k.weight", "transformer_blocks.0.img_mlp.net.2.weight"):
        (lora_file, patch), = view.patches_for(name)
        delta = lora_file.delta(patch, torch.device("cpu"))
        got = effective(out, name) - effective(outputs["nunchaku", "int4"], name)
        assert float((got - delta).norm() / delta.norm()) < 0.01, name  # A and B rounded to BF16, nothing else
    code, _, err = run_cli(["to-svdquant", model, "--calib", calib, *FAST, "--lora", f"{lora}:0", "--lora-mode",
                            "lowrank", "-o", tmp_path / "zero.safetensors", "-q"])
    assert code == 0, err
    base = tensors(outputs["nunchaku", "int4"])
    assert all(torch.equal(v, base[k]) for k, v in tensors(tmp_path / "zero.safetensors").items())


def test_lowrank_rank_limit(model, tmp_path):
    big = [tiny.make_tiny_lora(tmp_path / f"big{i}.safetensors", model, rank=256, seed=i) for i in range(2)]
    code, _, err = run_cli(["to-svdquant", model, "--rank", "16", "--lora", big[0], "--lora", big[1],
                            "--lora-mode", "lowrank", "-o", tmp_path / "x.safetensors"])
    assert_one_line_error(code, err, "above Nunchaku's limit of 1024", "--lora-mode bake")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("layout", ["nunchaku", "diffusers"])
def test_bake_lora_into_an_svdquant_file(model, outputs, tmp_path, layout):
    lora = tiny.make_tiny_lora(tmp_path / "l.safetensors", model)
    source = outputs[layout, "int4"]
    zero = tmp_path / ("zero" + (".safetensors" if layout == "nunchaku" else ""))
    code, _, err = run_cli(["bake-lora", source, "--lora", f"{lora}:0", "-o", zero, "-q"])
    assert code == 0, err
    weights = (lambda p: p) if layout == "nunchaku" else (lambda p: p / "diffusion_pytorch_model.safetensors")
    assert tensors(weights(zero)).keys() == tensors(weights(source)).keys()
    assert all(torch.equal(v, tensors(weights(source))[k]) for k, v in tensors(weights(zero)).items())
    baked = tmp_path / ("baked" + (".safetensors" if layout == "nunchaku" else ""))
    code, _, err = run_cli(["bake-lora", source, "--lora", lora, "-o", baked, "-q"])
    assert code == 0, err
    SVDQuantFile(baked)  # the same format, checked strictly
    from qconvert.core.lora import with_loras

    view = with_loras(open_checkpoint(model), [lora])
    name = "transformer_blocks.2.attn.to_out.0.weight"
    (lora_file, patch), = view.patches_for(name)
    want = effective(source, name) + lora_file.delta(patch, torch.device("cpu"))
    plain = float((effective(source, name) - want).norm())
    # at the file's rank the branch is truncated (the weakest directions go): closer than without the LoRA;
    # with room for it (--rank 32 >= 16 + 4) the LoRA is all there, up to BF16 rounding
    assert float((effective(baked, name) - want).norm()) < plain
    roomy = tmp_path / ("roomy" + (".safetensors" if layout == "nunchaku" else ""))
    code, _, err = run_cli(["bake-lora", source, "--lora", lora, "--rank", "32", "-o", roomy, "-q"])
    assert code == 0, err
    assert float((effective(roomy, name) - want).norm()) < plain / 15  # the branch re-rounded to BF16
    code, _, err = run_cli(["bake-lora", source, "--lora", lora, "--rank", "24", "-o", tmp_path / "x"])
    assert_one_line_error(code, err, "--rank 24")


def test_edit_2511_keeps_zero_cond_t_and_says_where_it_runs(tmp_path):
    model = tiny.make_tiny(tmp_path / "e", layers=1, variant="edit-2511")
    out = tmp_path / "e.safetensors"
    code, stdout, err = run_cli(["to-svdquant", model, *FAST, "-o", out])
    assert code == 0, err
    assert "Edit-2511 (zero_cond_t)" in stdout and "ComfyUI-nunchaku" in stdout
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["config"])["zero_cond_t"] is True
        assert "__index_timestep_zero__" not in f.keys()  # a marker, not a weight: Nunchaku's loader is strict
    assert SVDQuantFile(out).config.zero_cond_t


def test_nvfp4_is_closer_than_int4(outputs, model):
    """NVFP4's finer groups (16, FP8 scales) beat INT4's (64): per-layer weight error, same rank and search."""
    def mean_error(path):
        f = SVDQuantFile(path)
        names = [n for n in f.names() if n.endswith(".weight") and ("attn.to_" in n or "_mlp." in n)]
        src = open_checkpoint(model)
        errs = [float((f.load(n) - src.load(n).float()).norm() / src.load(n).float().norm()) for n in names]
        return sum(errs) / len(errs)
    assert mean_error(outputs["nunchaku", "nvfp4"]) < mean_error(outputs["nunchaku", "int4"])
