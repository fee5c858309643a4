"""LoRA merging and bake-lora, checked against merges written here in plain torch.

The expected weights never come from qconvert's key tables: each style's key
names are spelled out below, and diffusers' own Qwen LoRA converter serves
as a second, independent reading of the non-diffusers styles.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qconvert.cli import open_source
from qconvert.core import tiny
from qconvert.core.checkpoint import INDEX_NAME, open_checkpoint
from qconvert.core.errors import CheckpointError, QConvertError
from qconvert.core.lora import LoraFile, LoraView, parse_spec, with_loras
from qconvert.core.models import qwen_image as qi
from tests.cli_helpers import run as run_cli

ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
MLP = ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
MOD = ["img_mod.1", "txt_mod.1"]
TOP = ["img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
       "time_text_embed.timestep_embedder.linear_2"]
LAYERS = 3


def block_modules(parts, layers=LAYERS):
    return [f"transformer_blocks.{i}.{p}" for i in range(layers) for p in parts]


# Each style's key names, written out independently of qconvert.core.lora / tiny.LORA_STYLES.
def style_keys(style, m):
    f = m.replace(".", "_")
    return {
        "lightx2v": (f"{m}.lora_up.weight", f"{m}.lora_down.weight", f"{m}.alpha"),
        "peft": (f"transformer.{m}.lora_B.weight", f"transformer.{m}.lora_A.weight", f"transformer.{m}.alpha"),
        "peft-default": (f"{m}.lora_B.default.weight", f"{m}.lora_A.default.weight", f"{m}.alpha"),
        "kohya": (f"lora_unet_{f}.lora_up.weight", f"lora_unet_{f}.lora_down.weight", f"lora_unet_{f}.alpha"),
        "comfy": (f"diffusion_model.{m}.lora_up.weight", f"diffusion_model.{m}.lora_down.weight",
                  f"diffusion_model.{m}.alpha"),
        "ai-toolkit": (f"diffusion_model.{m}.lora_B.weight", f"diffusion_model.{m}.lora_A.weight",
                       f"diffusion_model.{m}.alpha"),
    }[style]


def source_weights(model: Path) -> dict:
    """Every tensor of a test model, read with safetensors alone (prefix stripped)."""
    files = sorted(model.glob("transformer/*.safetensors")) if model.is_dir() else [model]
    out = {}
    for f in files:
        for k, v in load_file(f).items():
            out[k.removeprefix("model.diffusion_model.")] = v
    return out


def reference_merge(weights: dict, loras) -> dict:
    """W + Σ strength·alpha/rank·up@down in float32, rounded once: (lora_path, style, strength, modules)."""
    acc = {}
    for path, style, strength, modules in loras:
        sd = load_file(path)
        for m in modules:
            up_k, down_k, alpha_k = style_keys(style, m)
            up, down = sd[up_k].float(), sd[down_k].float()
            scale = sd[alpha_k].item() / down.shape[0] if alpha_k in sd else 1.0
            name = f"{m}.weight"
            acc[name] = acc.get(name, weights[name].float()) + strength * scale * (up @ down)
    return {n: (acc[n].to(w.dtype) if n in acc else w) for n, w in weights.items()}


def assert_tensors_equal(view, expected: dict):
    assert sorted(view.names()) == sorted(expected)
    for name, want in expected.items():
        got = view.load(name)
        assert got.dtype == want.dtype, name
        assert torch.equal(got, want), name


def run(capsys, *args):
    return run_cli(args, capsys)


@pytest.fixture(scope="module")
def weights(tiny_model):
    return source_weights(tiny_model)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A folder for this module's LoRA files."""
    return tmp_path_factory.mktemp("loras")


# ------------------------------------------------------------------ key styles

@pytest.mark.parametrize("style", ["lightx2v", "peft", "peft-default", "kohya", "comfy", "ai-toolkit"])
def test_each_key_style_against_an_independent_merge(style, tiny_model, weights, loras):
    targets = ["attn", "mlp", "mod", *TOP]
    alpha = None if style == "ai-toolkit" else 8.0  # ai-toolkit writes no alpha
    dtype = torch.bfloat16 if style in ("ai-toolkit", "comfy") else torch.float32
    path = tiny.make_tiny_lora(loras / f"{style}.safetensors", tiny_model, style=style, rank=4, alpha=alpha,
                               targets=targets, seed=3, dtype=dtype)
    modules = block_modules(ATTN + MLP + MOD) + TOP
    assert set(safe_open(str(path), "pt").keys()) >= {style_keys(style, m)[0] for m in modules}
    with with_loras(open_checkpoint(tiny_model), [f"{path}:0.7"]) as view:
        assert view.patched_names() == sorted(f"{m}.weight" for m in modules)
        assert_tensors_equal(view, reference_merge(weights, [(path, style, 0.7, modules)]))


def test_kohya_names_of_every_kind_map_back_exactly(tiny_model, weights, loras):
    # Names where a naive "_" → "." rebuild goes wrong: add_q_proj, to_add_out, to_out_0, img_mlp_net_0_proj,
    # norm_out_linear, time_text_embed_...; and LyCORIS's prefix.
    literal = {
        "lora_unet_transformer_blocks_0_attn_add_q_proj": "transformer_blocks.0.attn.add_q_proj",
        "lora_unet_transformer_blocks_1_attn_to_add_out": "transformer_blocks.1.attn.to_add_out",
        "lora_unet_transformer_blocks_2_attn_to_out_0": "transformer_blocks.2.attn.to_out.0",
        "lora_unet_transformer_blocks_0_img_mlp_net_0_proj": "transformer_blocks.0.img_mlp.net.0.proj",
        "lora_unet_transformer_blocks_1_txt_mlp_net_2": "transformer_blocks.1.txt_mlp.net.2",
        "lora_unet_transformer_blocks_2_img_mod_1": "transformer_blocks.2.img_mod.1",
        "lora_unet_norm_out_linear": "norm_out.linear",
        "lora_unet_time_text_embed_timestep_embedder_linear_2": "time_text_embed.timestep_embedder.linear_2",
        "lora_unet_img_in": "img_in",
        "lycoris_transformer_blocks_1_txt_mod_1": "transformer_blocks.1.txt_mod.1",
    }
    g = torch.Generator().manual_seed(0)
    sd, expected = {}, dict(weights)
    for key, module in literal.items():
        out_dim, in_dim = weights[f"{module}.weight"].shape
        up, down = torch.randn(out_dim, 2, generator=g) * 0.05, torch.randn(2, in_dim, generator=g) * 0.05
        sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"] = up, down
        sd[f"{key}.alpha"] = torch.tensor(1.0)
        w = weights[f"{module}.weight"]
        expected[f"{module}.weight"] = (w.float() + 1.0 * (1.0 / 2) * (up @ down)).to(w.dtype)
    path = loras / "kohya-literal.safetensors"
    save_file(sd, path)
    with with_loras(open_checkpoint(tiny_model), [path]) as view:
        assert view.patched_names() == sorted(f"{m}.weight" for m in literal.values())
        assert_tensors_equal(view, expected)


@pytest.mark.parametrize("style", ["lightx2v", "kohya", "comfy", "peft-default"])
def test_key_mapping_agrees_with_diffusers_converter(style, tiny_model, weights, loras):
    lcu = pytest.importorskip("diffusers.loaders.lora_conversion_utils", reason="diffusers is an optional oracle")
    path = tiny.make_tiny_lora(loras / f"oracle-{style}.safetensors", tiny_model, style=style, rank=8,
                               alpha=4.0, targets=["attn", "mlp", "mod", *TOP], seed=5)
    converted = lcu._convert_non_diffusers_qwen_lora_to_diffusers(load_file(path))
    modules = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted})
    with with_loras(open_checkpoint(tiny_model), [path]) as view:
        assert view.patched_names() == sorted(f"{m}.weight" for m in modules)
        for m in modules:
            a, b = converted[f"transformer.{m}.lora_A.weight"], converted[f"transformer.{m}.lora_B.weight"]
            w = weights[f"{m}.weight"]
            want = w.float() + b.float() @ a.float()  # diffusers bakes alpha/rank into A and B
            got = view.load(f"{m}.weight")
            # Splitting the scale between A and B rounds differently: equal up to one bf16 step.
            torch.testing.assert_close(got, want.to(got.dtype))
            assert (got.float() - w.float()).abs().mean() > 10 * (got.float() - want).abs().mean(), m


# ------------------------------------------------------------------ merge rules

def test_several_loras_each_with_its_strength(tiny_model, weights, loras):
    a = tiny.make_tiny_lora(loras / "several-a.safetensors", tiny_model, style="kohya", rank=4, alpha=2.0,
                            targets=["attn"], seed=1)
    b = tiny.make_tiny_lora(loras / "several-b.safetensors", tiny_model, style="peft", rank=8,
                            targets=["qkv", "mlp"], seed=2, dtype=torch.float16)
    plan = [(a, "kohya", 0.8, block_modules(ATTN)),
            (b, "peft", -0.3, block_modules(["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj",
                                             "attn.add_k_proj", "attn.add_v_proj"] + MLP))]
    with with_loras(open_checkpoint(tiny_model), [f"{a}:0.8", (b, -0.3)]) as view:
        assert_tensors_equal(view, reference_merge(weights, plan))
        assert [lora["strength"] for lora in view.provenance()["loras"]] == [0.8, -0.3]


def test_strength_zero_changes_nothing(tiny_model, weights, loras):
    path = tiny.make_tiny_lora(loras / "zero.safetensors", tiny_model, style="lightx2v", alpha=3.0,
                               targets=["attn", "mlp", "mod"])
    with with_loras(open_checkpoint(tiny_model), [f"{path}:0"]) as view:
        assert view.patched_names() == []
        for name, w in weights.items():
            assert torch.equal(view.load(name).view(torch.int16), w.view(torch.int16)), name


def test_alpha_8_rank_64_scales_by_one_eighth(tiny_model, weights, loras):
    m = "transformer_blocks.1.attn.to_v"
    path = tiny.make_tiny_lora(loras / "lightning-like.safetensors", tiny_model, style="lightx2v", rank=64,
                               alpha=8.0, targets=[m])
    sd = load_file(path)
    w = weights[f"{m}.weight"]
    want = (w.float() + 1.0 * 0.125 * (sd[f"{m}.lora_up.weight"] @ sd[f"{m}.lora_down.weight"])).to(w.dtype)
    with with_loras(open_checkpoint(tiny_model), [path]) as view:
        assert view.loras[0].summary()["alpha_over_rank"] == [0.125]
        assert torch.equal(view.load(f"{m}.weight"), want)


def test_no_alpha_means_scale_one(tiny_model, weights, loras):
    m = "transformer_blocks.0.attn.to_q"
    path = tiny.make_tiny_lora(loras / "no-alpha.safetensors", tiny_model, style="peft", rank=16, targets=[m])
    sd = load_file(path)
    w = weights[f"{m}.weight"]
    want = (w.float() + 1.0 * (sd[f"transformer.{m}.lora_B.weight"] @ sd[f"transformer.{m}.lora_A.weight"]))
    with with_loras(open_checkpoint(tiny_model), [path]) as view:
        assert torch.equal(view.load(f"{m}.weight"), want.to(w.dtype))


def test_lora_on_modulation_layers(tiny_model, weights, loras):
    path = tiny.make_tiny_lora(loras / "mod.safetensors", tiny_model, style="comfy", rank=4, alpha=4.0,
                               targets=["mod"])
    modules = block_modules(MOD)
    with with_loras(open_checkpoint(tiny_model), [path]) as view:
        assert view.patched_names() == sorted(f"{m}.weight" for m in modules)
        assert view.load("transformer_blocks.0.img_mod.1.weight").shape == (6 * 256, 256)
        assert_tensors_equal(view, reference_merge(weights, [(path, "comfy", 1.0, modules)]))


def test_full_differences_diff_and_diff_b(tiny_model, weights, loras):
    g = torch.Generator().manual_seed(7)
    q, norm = "transformer_blocks.0.attn.to_q", "transformer_blocks.2.attn.norm_k"
    diff = torch.randn(256, 256, generator=g) * 0.01
    diff_b = torch.randn(256, generator=g) * 0.01
    diff_norm = torch.randn(128, generator=g) * 0.1
    path = loras / "diff.safetensors"
    save_file({f"diffusion_model.{q}.diff": diff, f"diffusion_model.{q}.diff_b": diff_b,
               f"{norm}.diff": diff_norm}, path)
    expected = dict(weights)
    for name, d in ((f"{q}.weight", diff), (f"{q}.bias", diff_b), (f"{norm}.weight", diff_norm)):
        expected[name] = (weights[name].float() + 0.5 * d).to(weights[name].dtype)
    with with_loras(open_checkpoint(tiny_model), [f"{path}:0.5"]) as view:
        assert view.patched_names() == sorted([f"{q}.weight", f"{q}.bias", f"{norm}.weight"])
        assert_tensors_equal(view, expected)


def test_loads_read_only_the_factors_they_need(tiny_model, loras, monkeypatch):
    path = tiny.make_tiny_lora(loras / "lazy.safetensors", tiny_model, style="kohya", alpha=1.0)
    read = []
    original = LoraFile.tensor
    monkeypatch.setattr(LoraFile, "tensor", lambda self, key: read.append(key) or original(self, key))
    view = with_loras(open_checkpoint(tiny_model), [path])
    assert all(k.endswith(".alpha") for k in read), "opening reads alphas only"
    read.clear()
    view.load("transformer_blocks.1.attn.to_k.weight")
    assert sorted(read) == ["lora_unet_transformer_blocks_1_attn_to_k.lora_down.weight",
                            "lora_unet_transformer_blocks_1_attn_to_k.lora_up.weight"]
    read.clear()
    view.load("transformer_blocks.1.attn.to_k.bias")
    assert read == []


# ------------------------------------------------------------------ strictness

def _pair(sd, stem, out_dim, in_dim, rank=2):
    sd[f"{stem}.lora_up.weight"] = torch.ones(out_dim, rank) * 0.01
    sd[f"{stem}.lora_down.weight"] = torch.ones(rank, in_dim) * 0.01


@pytest.fixture(scope="module")
def unmatched_lora(loras):
    sd = {}
    _pair(sd, "transformer_blocks.0.attn.to_q", 256, 256)
    _pair(sd, "transformer_blocks.7.attn.to_q", 256, 256)  # the tiny model has 3 blocks
    _pair(sd, "lora_te1_text_model_encoder_layers_0_mlp_fc1", 64, 32)
    path = loras / "unmatched.safetensors"
    save_file(sd, path)
    return path


def test_unmatched_keys_are_an_error_listing_them(tiny_model, unmatched_lora):
    with pytest.raises(QConvertError) as exc:
        with_loras(open_checkpoint(tiny_model), [unmatched_lora])
    msg = str(exc.value)
    assert "unmatched.safetensors" in msg and "4 key(s)" in msg
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in msg
    assert "transformer_blocks.7.attn.to_q" in msg
    assert "text-encoder" in msg and "--ignore-unmatched" in msg


def test_unmatched_keys_on_the_command_line_write_nothing(tmp_path, capsys, tiny_model, unmatched_lora):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "bake-lora", tiny_model, "--lora", unmatched_lora, "-o", out)
    assert code == 1 and err.startswith("error: LoRA unmatched.safetensors: 4 key(s)")
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_ignore_unmatched_warns_with_the_count(tmp_path, capsys, tiny_model, weights, unmatched_lora):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "bake-lora", tiny_model, "--lora", unmatched_lora, "--ignore-unmatched",
                            "-o", out, "--quiet")
    assert code == 0
    assert "warning: LoRA unmatched.safetensors: ignoring 4 key(s)" in err
    sd = load_file(unmatched_lora)
    name = "transformer_blocks.0.attn.to_q.weight"
    stem = "transformer_blocks.0.attn.to_q"
    want = weights[name].float() + 1.0 * (sd[f"{stem}.lora_up.weight"] @ sd[f"{stem}.lora_down.weight"])
    assert torch.equal(open_checkpoint(out).load(name), want.to(torch.bfloat16))


def test_shape_mismatch_is_an_error_even_with_ignore_unmatched(tiny_model, loras):
    sd = {}
    _pair(sd, "transformer.transformer_blocks.0.attn.to_q", 3072, 3072)  # full-size LoRA, tiny model
    path = loras / "shape.safetensors"
    save_file(sd, path)
    for ignore in (False, True):
        with pytest.raises(QConvertError, match=r"to_q: LoRA makes \[3072, 3072\] but the model has \[256, 256\]"):
            with_loras(open_checkpoint(tiny_model), [path], ignore_unmatched=ignore)


@pytest.mark.parametrize("case, sd, message", [
    ("up-only", {"transformer_blocks.0.attn.to_q.lora_up.weight": torch.zeros(256, 2)}, "no matching down"),
    ("rank", {"transformer_blocks.0.attn.to_q.lora_up.weight": torch.zeros(256, 2),
              "transformer_blocks.0.attn.to_q.lora_down.weight": torch.zeros(3, 256)}, "not a rank-r pair"),
    ("alpha-shape", {"transformer_blocks.0.attn.to_q.lora_up.weight": torch.zeros(256, 2),
                     "transformer_blocks.0.attn.to_q.lora_down.weight": torch.zeros(2, 256),
                     "transformer_blocks.0.attn.to_q.alpha": torch.ones(2)}, "an alpha is one number"),
    ("dora", {"transformer_blocks.0.attn.to_q.lora_up.weight": torch.zeros(256, 2),
              "transformer_blocks.0.attn.to_q.lora_down.weight": torch.zeros(2, 256),
              "transformer_blocks.0.attn.to_q.dora_scale": torch.ones(1, 256)}, "DoRA"),
    ("twice", {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 256),
               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(256, 2),
               "transformer_blocks.0.attn.to_q.lora_down.weight": torch.zeros(2, 256),
               "transformer_blocks.0.attn.to_q.lora_up.weight": torch.zeros(256, 2)}, "both give"),
    ("integer", {"transformer_blocks.0.attn.to_q.diff": torch.zeros(256, 256, dtype=torch.int32)}, "I32"),
    ("only-text-encoder", {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2),
                           "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4)},
     "none of its 2 keys"),
])
def test_malformed_loras_are_errors(case, sd, message, tiny_model, tmp_path):
    path = tmp_path / f"{case}.safetensors"
    save_file(sd, path)
    with pytest.raises(QConvertError, match=message):
        with_loras(open_checkpoint(tiny_model), [path], ignore_unmatched=True)


def test_pickles_and_damaged_files_are_refused(tiny_model, tmp_path, loras):
    pickle = tmp_path / "lora.pt"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="pickle"):
        with_loras(open_checkpoint(tiny_model), [pickle])
    good = tiny.make_tiny_lora(loras / "to-damage.safetensors", tiny_model, targets=["img_in"])
    bad = tmp_path / "damaged.safetensors"
    bad.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        with_loras(open_checkpoint(tiny_model), [bad])
    with pytest.raises(QConvertError, match="no such file"):
        with_loras(open_checkpoint(tiny_model), [tmp_path / "missing.safetensors:0.5"])


def test_parse_spec(tmp_path):
    assert parse_spec("a/b.safetensors:0.8") == parse_spec((Path("a/b.safetensors"), 0.8))
    assert parse_spec("a/b.safetensors:0.8").strength == 0.8
    assert parse_spec("b.safetensors:-1.5e-1").strength == -0.15
    assert parse_spec("b.safetensors").strength == 1.0
    assert parse_spec("dir:1/with:colons.safetensors").path == Path("dir:1/with:colons.safetensors")
    assert parse_spec("b.safetensors:.5").strength == 0.5
    odd = tmp_path / "x.safetensors:2"  # an existing file whose name ends like a strength
    odd.write_bytes(b"")
    assert parse_spec(str(odd)).path == odd and parse_spec(str(odd)).strength == 1.0
    with pytest.raises(QConvertError, match="finite"):
        parse_spec(("b.safetensors", float("inf")))
    with pytest.raises(QConvertError, match="not a number"):
        parse_spec(("b.safetensors", "strong"))


# ------------------------------------------------------------------ the view

def test_view_has_the_checkpoint_interface(tiny_model, loras):
    path = tiny.make_tiny_lora(loras / "Qwen-Image-Lightning-4steps.safetensors", tiny_model, alpha=1.0)
    ckpt = open_checkpoint(tiny_model)
    view = open_source(str(tiny_model), loras=(f"{path}:0.5",))
    assert isinstance(view, LoraView)
    for attr in ("config", "tensors", "layout", "path", "metadata", "extra", "variant"):
        assert getattr(view, attr) == getattr(ckpt, attr), attr
    assert view.names() == ckpt.names() and view.shapes() == ckpt.shapes()
    assert view.name == "tiny-qwen-image-qwen-image-lightning-4steps-x0.5"
    prov = view.provenance()
    assert prov["source_fingerprint"] == ckpt.provenance()["source_fingerprint"]
    assert prov["loras"] == [{"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                              "strength": 0.5}]
    with view:
        pass


# ------------------------------------------------------------------ bake-lora

def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bake_lora_diffusers_folder_round_trip(tmp_path, capsys, tiny_model, weights, loras):
    a = tiny.make_tiny_lora(loras / "bake-a.safetensors", tiny_model, style="kohya", rank=4, alpha=8.0,
                            targets=["attn", "mod"], seed=11)
    b = tiny.make_tiny_lora(loras / "bake-b.safetensors", tiny_model, style="ai-toolkit", rank=2,
                            targets=["mlp"], seed=12, dtype=torch.bfloat16)
    out = tmp_path / "baked"
    args = ["bake-lora", tiny_model, "--lora", f"{a}:0.9", "--lora", b, "-o", out, "--json"]
    code, stdout, _ = run(capsys, *args, "--dry-run")
    assert code == 0 and not out.exists()
    plan = json.loads(stdout)
    assert plan["dry_run"] and plan["changed_tensors"] == 3 * (8 + 2 + 4)
    assert plan["loras"][0]["tensors"] == sorted(f"{m}.weight" for m in block_modules(ATTN + MOD))
    code, stdout, _ = run(capsys, *args)
    assert code == 0
    report = json.loads(stdout)
    written = _files(out)
    assert report["total_bytes"] == plan["total_bytes"] == sum(len(v) for v in written.values())

    src = _files(tiny_model)
    assert sorted(written) == sorted(src)  # same files: model_index, config, the same shards, the index
    assert written["model_index.json"] == src["model_index.json"]
    assert written["transformer/config.json"] == src["transformer/config.json"]
    assert json.loads(written[f"transformer/{INDEX_NAME}"])["weight_map"] == \
        json.loads(src[f"transformer/{INDEX_NAME}"])["weight_map"]

    expected = reference_merge(weights, [(a, "kohya", 0.9, block_modules(ATTN + MOD)),
                                         (b, "ai-toolkit", 1.0, block_modules(MLP))])
    baked = source_weights(out)
    assert sorted(baked) == sorted(expected)
    for name, want in expected.items():
        assert torch.equal(baked[name], want), name

    shard = next(out.glob("transformer/*.safetensors"))
    prov = json.loads(safe_open(str(shard), "pt").metadata()["qconvert"])
    assert prov["loras"] == [
        {"file": "bake-a.safetensors", "sha256": hashlib.sha256(a.read_bytes()).hexdigest(), "strength": 0.9},
        {"file": "bake-b.safetensors", "sha256": hashlib.sha256(b.read_bytes()).hexdigest(), "strength": 1.0}]
    assert prov["tool"] == "qconvert" and prov["source_fingerprint"].startswith("sha256-sampled:")

    again = tmp_path / "again"
    assert run(capsys, "bake-lora", tiny_model, "--lora", f"{a}:0.9", "--lora", b, "-o", again, "-q")[0] == 0
    assert _files(again) == written, "same inputs and options give the same bytes"


def test_baked_folder_loads_in_diffusers(tmp_path, tiny_model, weights, loras):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional oracle")
    path = tiny.make_tiny_lora(loras / "for-diffusers.safetensors", tiny_model, style="lightx2v", alpha=2.0,
                               targets=["attn", "mod"], seed=4)
    out = tmp_path / "baked"
    with with_loras(open_checkpoint(tiny_model), [path]) as view:
        from qconvert.converters.bake import bake, bake_plan

        bake(view, bake_plan(view, out), quiet=True)
    model = diffusers.QwenImageTransformer2DModel.from_pretrained(out, subfolder="transformer",
                                                                    torch_dtype=torch.bfloat16)
    state = model.state_dict()
    expected = reference_merge(weights, [(path, "lightx2v", 1.0, block_modules(ATTN + MOD))])
    for name in ("transformer_blocks.2.attn.add_v_proj.weight", "transformer_blocks.0.txt_mod.1.weight",
                 "transformer_blocks.1.img_mlp.net.2.weight"):
        assert torch.equal(state[name], expected[name]), name


def test_bake_lora_single_file_keeps_keys_prefix_and_marker(tmp_path, capsys, loras):
    src = tiny.make_tiny_single_file(tmp_path / "qwen_image_edit_2511_bf16.safetensors", variant="edit-2511",
                                     prefix="model.diffusion_model.")
    path = tiny.make_tiny_lora(loras / "single.safetensors", src, style="comfy", alpha=4.0,
                               targets=["attn", "mlp", "mod"], seed=9)
    out = tmp_path / "baked.safetensors"
    code, _, _ = run(capsys, "bake-lora", src, "--lora", f"{path}:0.6", "-o", out, "-q")
    assert code == 0
    with safe_open(str(src), "pt") as s, safe_open(str(out), "pt") as o:
        assert sorted(o.keys()) == sorted(s.keys())
        assert "model.diffusion_model.__index_timestep_zero__" in o.keys()
    expected = reference_merge(source_weights(src), [(path, "comfy", 0.6, block_modules(ATTN + MLP + MOD))])
    baked = source_weights(out)
    for name, want in expected.items():
        assert torch.equal(baked[name], want), name
    assert open_checkpoint(out).variant == "qwen-image-edit-2511"


def test_bake_lora_single_file_strength_zero_is_bit_identical(tmp_path, capsys, tiny_single_file, loras):
    path = tiny.make_tiny_lora(loras / "zero-single.safetensors", tiny_single_file, style="kohya", alpha=1.0)
    out = tmp_path / "same.safetensors"
    assert run(capsys, "bake-lora", tiny_single_file, "--lora", f"{path}:0", "-o", out, "-q")[0] == 0
    with safe_open(str(tiny_single_file), "pt") as s, safe_open(str(out), "pt") as o:
        assert sorted(o.keys()) == sorted(s.keys())
        for k in s.keys():
            assert s.get_tensor(k).view(torch.int16).equal(o.get_tensor(k).view(torch.int16)), k


def test_bake_lora_transformer_folder(tmp_path, capsys, tiny_model, loras):
    path = tiny.make_tiny_lora(loras / "tf.safetensors", tiny_model, style="peft", targets=["img_in"])
    out = tmp_path / "transformer-out"
    assert run(capsys, "bake-lora", tiny_model / "transformer", "--lora", path, "-o", out, "-q")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tiny_model / "transformer").iterdir())
    assert open_checkpoint(out).layout == "transformer-folder"


def test_bake_lora_default_output_name(tmp_path, capsys, tiny_single_file, loras, monkeypatch):
    path = tiny.make_tiny_lora(loras / "Lightning.safetensors", tiny_single_file, targets=["proj_out"])
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "bake-lora", tiny_single_file, "--lora", f"{path}:0.5", "-q")[0] == 0
    assert (tmp_path / "tiny-qwen-image-lightning-x0.5.safetensors").is_file()
    folder = tmp_path / "comfy-models"
    folder.mkdir()
    assert run(capsys, "bake-lora", tiny_single_file, "--lora", path, "-o", folder, "-q")[0] == 0
    assert [p.name for p in folder.iterdir()] == ["tiny-qwen-image-lightning.safetensors"]


def test_bake_lora_command_line_errors(tmp_path, capsys, tiny_model, tiny_single_file, loras):
    path = tiny.make_tiny_lora(loras / "cli.safetensors", tiny_model, targets=["img_in"])
    code, _, err = run(capsys, "bake-lora", tiny_model, "-o", tmp_path / "x")
    assert code == 2 and "at least one --lora" in err
    code, _, err = run(capsys, "bake-lora", tiny_model, "--lora", path, "-o", tiny_model)
    assert code == 1 and "would overwrite the input" in err
    code, _, err = run(capsys, "bake-lora", tiny_model, "--lora", path, "-o", tiny_model / "transformer")
    assert code == 1 and "would overwrite the input" in err
    code, _, err = run(capsys, "bake-lora", tiny_model, "--lora", path, "-o", tmp_path / "x.safetensors")
    assert code == 1 and "give a folder name" in err
    code, _, err = run(capsys, "bake-lora", tiny_single_file, "--lora", path, "-o", tmp_path / "x.gguf")
    assert code == 1 and "ending in .safetensors" in err
    code, _, err = run(capsys, "bake-lora", tiny_model, "--lora", tmp_path / "nope.safetensors:0.5",
                       "-o", tmp_path / "y")
    assert code == 1 and err.startswith("error: LoRA") and "no such file" in err
    code, _, err = run(capsys, "bake-lora", tiny_model, "--lora", path, "--device", "bogus", "-o", tmp_path / "z")
    assert code == 1 and "not a device" in err
    assert list(tmp_path.iterdir()) == []


def test_full_size_dry_run_reads_no_data(tmp_path, capsys, full_size_sparse):
    m = "transformer_blocks.59.img_mod.1"
    path = tiny.make_tiny_lora(tmp_path / "full.safetensors", qi.QwenImageConfig(), style="lightx2v", rank=4,
                               alpha=1.0, targets=[m])
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "bake-lora", full_size_sparse, "--lora", path, "-o", out, "--dry-run", "--json")
    assert code == 0 and not out.exists()
    plan = json.loads(stdout)
    assert plan["loras"][0]["tensors"] == [f"{m}.weight"] and plan["tensors"] == 1933
    source_bytes = sum(p.stat().st_size for p in full_size_sparse.rglob("*") if p.is_file())
    assert 0 < plan["total_bytes"] - source_bytes < 64 * 1024  # the same data plus provenance metadata


def test_small_lora_on_the_wrong_model_size(tmp_path, full_size_sparse, tiny_model):
    path = tiny.make_tiny_lora(tmp_path / "tiny.safetensors", tiny_model, targets=["attn"])
    with pytest.raises(QConvertError, match="a LoRA for another model"):
        with_loras(open_checkpoint(full_size_sparse), [path])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no GPU")
def test_cuda_device_without_a_gpu(tiny_model, loras):
    path = tiny.make_tiny_lora(loras / "cuda.safetensors", tiny_model, targets=["img_in"])
    with pytest.raises(QConvertError, match="no CUDA device"):
        with_loras(open_checkpoint(tiny_model), [path], device="cuda")


def test_view_reads_again_after_close(tmp_path, tiny_model, loras):
    # Closing drops the file handles (source and LoRAs); a later load opens them again.
    path = tiny.make_tiny_lora(loras / "reopen.safetensors", tiny_model, targets=["txt_in"])
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    view = with_loras(open_checkpoint(copy), [path])
    first = view.load("txt_in.weight")
    view.close()
    assert torch.equal(view.load("txt_in.weight"), first)


def test_whole_comfy_checkpoint_keeps_the_transformer_and_says_so(tmp_path, capsys, weights, tiny_model, loras):
    tensors = {f"model.diffusion_model.{n}": w for n, w in weights.items()}
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4)
    tensors["text_encoders.qwen25_7b.transformer.model.norm.weight"] = torch.ones(8)
    src = tmp_path / "all-in-one.safetensors"
    save_file(tensors, src)
    path = tiny.make_tiny_lora(loras / "aio.safetensors", tiny_model, targets=["img_in"])
    out = tmp_path / "out.safetensors"
    code, stdout, _ = run(capsys, "bake-lora", src, "--lora", path, "-o", out)
    assert code == 0 and "2 tensors outside the transformer" in stdout
    with safe_open(str(out), "pt") as o:
        assert sorted(o.keys()) == sorted(f"model.diffusion_model.{n}" for n in weights)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_merging_on_cuda_matches_cpu(tiny_model, loras):
    path = tiny.make_tiny_lora(loras / "gpu.safetensors", tiny_model, alpha=2.0, targets=["attn", "mod"])
    with with_loras(open_checkpoint(tiny_model), [path]) as cpu, \
            with_loras(open_checkpoint(tiny_model), [path], device="cuda") as gpu:
        for name in cpu.patched_names():
            got = gpu.load(name)
            assert got.device.type == "cpu"
            torch.testing.assert_close(got, cpu.load(name))
