"""``qconvert to-gguf``: layout, exact sizes, streaming, errors, and loading where users load it.

The oracles are gguf-py's reader, diffusers' GGUF loader and QwenImageTransformer2DModel,
ggml's own quantizers (``tests/ggml_oracle.py``) and a replica of ComfyUI-GGUF's
``gguf_sd_loader`` checks (spec gguf.md §10.1).
"""

from __future__ import annotations

import hashlib
import json
import os
import types
import warnings
import weakref
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from qconvert.core import tiny
from qconvert.core.checkpoint import Checkpoint, open_checkpoint
from qconvert.core.errors import QConvertError
from qconvert.core.io import write_safetensors
from qconvert.core.models import qwen_image as qi
from qconvert.formats.gguf import policy, writer
from tests import ggml_oracle
from tests.cli_helpers import assert_one_line_error, run

# One of each family, written side by side; `--level all` runs in the slow test.
FAST_LEVELS = ["BF16", "F16", "Q8_0", "Q5_0", "Q4_K_S", "IQ4_NL", "IQ4_XS"]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class RecordingSource:
    """A source that records every load and fails if more than two tensors
    would be alive: the one being encoded and the next, read ahead."""

    def __init__(self, source):
        self._source = source
        self.loads: list[str] = []
        self._alive: list = []

    def __getattr__(self, attr):
        return getattr(self._source, attr)

    def load(self, name):
        if len(self._alive) == 2 and self._alive[0]() is not None:
            raise AssertionError(f"{self.loads[-2]} is still in memory when {name} is read")
        tensor = self._source.load(name)
        self.loads.append(name)
        self._alive = [*self._alive[-1:], weakref.ref(tensor)]
        return tensor


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """Two blocks instead of three: the K-quant encoders are the slow part of these tests."""
    return tiny.make_tiny(tmp_path_factory.mktemp("models") / "small-qwen-image", layers=2)


@pytest.fixture(scope="module")
def written(small_model, tmp_path_factory):
    """FAST_LEVELS with --minimal-metadata, written in one pass: (source, plans, paths, recorded loads)."""
    out = tmp_path_factory.mktemp("gguf")
    source = RecordingSource(open_checkpoint(small_model))
    plans = writer.plan_files(source, FAST_LEVELS, policy="city96", minimal_metadata=True)
    paths = writer.output_paths(source.name, FAST_LEVELS, out)
    writer.write_gguf(source, plans, paths, quiet=True)
    return source, plans, paths, list(source.loads)


def ggml_encode(oracle, x: torch.Tensor, qtype) -> np.ndarray:
    """``x`` as ggml's ``ggml_quantize_chunk`` writes it, shaped like ``quants.quantize``'s result."""
    return oracle.quantize(x.float().numpy(), qtype).reshape(*x.shape[:-1], -1)


def ggml_quants(oracle):
    """A stand-in for our ``quants`` module that encodes with ggml."""
    return types.SimpleNamespace(quantize=lambda x, qtype, *a, **kw: ggml_encode(oracle, x, qtype))


# ------------------------------------------------------------------ layout

def test_plan_size_is_the_written_size(written):
    _, plans, paths, _ = written
    for plan, path in zip(plans, paths):
        assert path.name == f"small-qwen-image-{plan.level}.gguf"
        assert path.stat().st_size == plan.bytes, plan.level


def test_each_tensor_is_read_once_and_released(written):
    source, _, _, loads = written
    assert loads == sorted(source.names())  # once, in file order, for all five files


GENERAL_KEYS = ["general.architecture", "general.quantization_version", "general.file_type"]


def kv_keys(reader) -> list[str]:
    return [k for k in reader.fields if not k.startswith("GGUF.")]


def test_reader_sees_the_planned_layout(written):
    source, plans, paths, _ = written
    for plan, path in zip(plans, paths):
        reader = gguf.GGUFReader(path)
        assert kv_keys(reader) == GENERAL_KEYS  # --minimal-metadata: exactly these, in this order
        assert reader.fields["general.architecture"].contents() == "qwen_image"
        assert reader.fields["general.quantization_version"].contents() == 2
        assert reader.fields["general.file_type"].contents() == policy.FILE_TYPE[plan.level]
        assert reader.alignment == 32
        assert [t.name for t in reader.tensors] == sorted(source.names())
        want = policy.assign_types(source.shapes(), plan.level, source.config)
        for t in reader.tensors:
            assert t.tensor_type == want[t.name], t.name
            assert tuple(int(d) for d in t.shape) == tuple(reversed(source.tensors[t.name].shape))  # ne order
            assert t.data_offset % 32 == 0


def test_values_round_trip(written):
    """BF16 is lossless; F16 only rounds values below its normal range; quantized tensors decode close."""
    source, plans, paths, _ = written
    for plan, path in zip(plans, paths):
        for t in gguf.GGUFReader(path).tensors:
            if t.name not in ("txt_norm.weight", "img_in.weight", "transformer_blocks.1.img_mod.1.weight"):
                continue
            want = source.load(t.name).float().numpy()
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
            if t.tensor_type in (T.F32, T.BF16):
                np.testing.assert_array_equal(got, want)
            elif t.tensor_type == T.F16:
                np.testing.assert_allclose(got, want, rtol=0, atol=2.0 ** -25)  # half an F16 subnormal step
            else:  # 4-bit types err about 0.1 on trained-looking weights, 5 bits and more under 0.05
                bound = 0.12 if t.tensor_type in (T.IQ4_NL, T.IQ4_XS, T.Q4_0, T.Q4_K) else 0.05
                error = np.linalg.norm(got - want) / np.linalg.norm(want)
                assert error < bound, (plan.level, t.name, error)


def test_provenance_metadata_is_deterministic(small_model, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    code, js, err = run(["to-gguf", small_model, "--level", "BF16", "-o", out, "--dry-run", "--json"], capsys)
    assert code == 0, err
    digests = set()
    for _ in range(2):
        code, _, err = run(["to-gguf", small_model, "--level", "BF16", "-o", out, "-q"], capsys)
        assert code == 0, err
        digests.add(sha256(out))
    assert len(digests) == 1  # same source and options, same bytes
    assert out.stat().st_size == json.loads(js)["bytes"]
    reader = gguf.GGUFReader(out)
    keys = kv_keys(reader)
    assert keys[:3] == GENERAL_KEYS and keys[3:] == sorted(keys[3:])
    assert all(k.startswith("qconvert.") for k in keys[3:])
    meta = {k: reader.fields[k].contents() for k in keys[3:]}
    assert meta["qconvert.level"] == "BF16" and meta["qconvert.policy"] == "city96"
    assert meta["qconvert.tool_version"] == __import__("qconvert").__version__
    assert meta["qconvert.source"] == str(small_model) and meta["qconvert.variant"] == "qwen-image"
    assert meta["qconvert.source_fingerprint"] == "sha256-sampled:" + open_checkpoint(small_model).fingerprint()


@pytest.mark.oracle
def test_minimal_files_equal_gguf_py_writing_ggml_bytes(written):
    """What city96's convert.py + llama-quantize write: gguf-py's standard calls around ggml's bytes."""
    oracle, why = ggml_oracle.load()
    if oracle is None:
        pytest.skip(why)
    source, plans, paths, _ = written
    for plan, path in zip(plans, paths):
        ref_path = path.with_name("ref-" + path.name)
        ref = gguf.GGUFWriter(ref_path, arch="qwen_image")
        ref.add_quantization_version(gguf.GGML_QUANT_VERSION)
        ref.add_file_type(policy.FILE_TYPE[plan.level])
        for name, qtype in policy.assign_types(source.shapes(), plan.level, source.config).items():
            ref.add_tensor(name, ggml_encode(oracle, source.load(name), qtype), raw_dtype=qtype)
        ref.write_header_to_file()
        ref.write_kv_data_to_file()
        ref.write_tensors_to_file()
        ref.close()
        assert sha256(path) == sha256(ref_path), plan.level


# ------------------------------------------------------------------ loaders

COMFY_IMG_ARCH_LIST = {"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan", "lumina2",
                       "qwen_image"}  # ComfyUI-GGUF loader.py @ 795e451
COMFY_DEQUANT_TYPES = {T.BF16, T.Q8_0, T.Q5_1, T.Q5_0, T.Q4_1, T.Q4_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K,
                       T.IQ4_NL, T.IQ4_XS}  # dequant.py's torch dequantizers


def comfy_gguf_state_dict(path) -> dict:
    """ComfyUI-GGUF's ``gguf_sd_loader`` checks, replayed: name -> (type, logical shape)."""
    reader = gguf.GGUFReader(path)
    assert not any(t.name.startswith("model.diffusion_model.") for t in reader.tensors)
    field = reader.get_field("general.architecture")
    assert field is not None and field.types == [gguf.GGUFValueType.STRING]
    assert str(field.parts[field.data[-1]], encoding="utf-8") in COMFY_IMG_ARCH_LIST
    state = {}
    for t in reader.tensors:
        assert reader.get_field(f"comfy.gguf.orig_shape.{t.name}") is None
        shape = torch.Size(int(v) for v in reversed(t.shape))
        with warnings.catch_warnings():  # as ComfyUI does: the memmap is read-only
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(t.data)
        if t.tensor_type in (T.F32, T.F16):
            data.view(*shape)  # ComfyUI views float data to the logical shape
        else:
            assert t.tensor_type in COMFY_DEQUANT_TYPES, t.name
            _, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            assert data.numel() == t.n_bytes and t.n_bytes % type_size == 0
        # 1-D tensors must be F32 (1-D BF16 broke before ComfyUI-GGUF a57094a) and RMSNorm
        # gains must be torch-compatible: GGMLOps does not override RMSNorm.
        if len(shape) <= 1 or (qi.is_known(t.name) and qi.describe(t.name).role in (qi.Role.QK_NORM, qi.Role.NORM)):
            assert t.tensor_type == T.F32, t.name
        state[t.name] = (t.tensor_type, shape)
    return state


def check_comfy_detection(state: dict, config) -> None:
    """ComfyUI's model_detection: Qwen-Image by txt_norm.weight, in_channels and the block count."""
    assert "txt_norm.weight" in state
    assert state["img_in.weight"][1] == (config.inner_dim, config.in_channels)
    blocks = {n.split(".")[1] for n in state if n.startswith("transformer_blocks.")}
    assert len(blocks) == config.num_layers


def test_comfyui_gguf_loader_rules(written):
    source, _, paths, _ = written
    for path in paths:
        check_comfy_detection(comfy_gguf_state_dict(path), source.config)


@pytest.fixture(scope="module")
def diffusers_forward():
    """``forward(model, gguf=None) -> output``: a model folder's BF16 weights, or a GGUF of it, on a fixed input."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the GGUF loading oracle")
    cls = diffusers.QwenImageTransformer2DModel

    def forward(model: Path, gguf_path: Path | None = None) -> torch.Tensor:
        if gguf_path is None:
            net = cls.from_pretrained(model, subfolder="transformer", torch_dtype=torch.bfloat16)
        else:
            net = cls.from_single_file(
                str(gguf_path), quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.bfloat16),
                torch_dtype=torch.bfloat16, config=str(model), subfolder="transformer")
        config = net.config
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return net(hidden_states=torch.randn(1, 16, config.in_channels, generator=g).to(torch.bfloat16),
                       encoder_hidden_states=torch.randn(1, 7, config.joint_attention_dim,
                                                         generator=g).to(torch.bfloat16),
                       encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.long),
                       timestep=torch.tensor([0.5]), img_shapes=[(1, 4, 4)], return_dict=False)[0].float()

    return forward


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def compare_with_ggml(model, plans, paths, forward, tmp_path) -> None:
    """Each file's output error vs the BF16 model is no larger than that of the same file made with ggml."""
    ref = forward(model)
    ours = {plan.level: relative_error(forward(model, path), ref) for plan, path in zip(plans, paths)}
    if "BF16" in ours:
        assert ours["BF16"] == 0.0  # BF16 weights load back exactly
    assert all(np.isfinite(e) and e < 1.0 for e in ours.values()), ours
    oracle, why = ggml_oracle.load()
    if oracle is None:
        pytest.skip(f"no ggml comparison: {why}")
    ggml_paths = [tmp_path / f"ggml-{p.name}" for p in paths]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(writer, "quants", ggml_quants(oracle))
        writer.write_gguf(open_checkpoint(model), plans, ggml_paths, quiet=True)
    for plan, path in zip(plans, ggml_paths):
        theirs = relative_error(forward(model, path), ref)
        assert ours[plan.level] <= theirs * (1 + 1e-3) + 1e-6, (plan.level, ours[plan.level], theirs)


@pytest.mark.oracle
def test_diffusers_output_error_no_larger_than_ggml(small_model, written, diffusers_forward, tmp_path):
    _, plans, paths, _ = written
    compare_with_ggml(small_model, plans, paths, diffusers_forward, tmp_path)


@pytest.mark.slow
@pytest.mark.oracle
def test_every_level_loads_and_matches_ggml(tiny_model, diffusers_forward, tmp_path, capsys):
    out = tmp_path / "all"
    code, _, err = run(["to-gguf", tiny_model, "--level", "all", "-o", out, "-q"], capsys)
    assert code == 0, err
    source = open_checkpoint(tiny_model)
    plans = writer.plan_files(source, policy.LEVELS, policy="city96")
    paths = writer.output_paths(source.name, policy.LEVELS, out)
    assert sorted(os.listdir(out)) == sorted(p.name for p in paths)
    for plan, path in zip(plans, paths):
        assert path.stat().st_size == plan.bytes
        check_comfy_detection(comfy_gguf_state_dict(path), source.config)
    compare_with_ggml(tiny_model, plans, paths, diffusers_forward, tmp_path)


def test_edit_2511_marker_survives(tmp_path, capsys):
    src = tiny.make_tiny_single_file(tmp_path / "edit.safetensors", layers=1, variant="edit-2511")
    out = tmp_path / "edit-Q8_0.gguf"
    code, _, err = run(["to-gguf", src, "--level", "Q8_0", "-o", out, "-q"], capsys)
    assert code == 0, err
    marker = next(t for t in gguf.GGUFReader(out).tensors if t.name == qi.MARKER_EDIT_2511)
    assert marker.tensor_type == T.F32 and list(marker.shape) == [0] and marker.n_bytes == 0
    state = comfy_gguf_state_dict(out)
    assert state[qi.MARKER_EDIT_2511] == (T.F32, torch.Size([0]))  # ComfyUI's buffer is torch.tensor([])
    assert out.stat().st_size == writer.plan_files(open_checkpoint(src), ["Q8_0"], policy="city96")[0].bytes


# ---------------------------------------------------------- dry run, CLI, errors

def test_full_size_dry_run_reads_no_tensor_data(full_size_sparse, capsys, monkeypatch):
    monkeypatch.setattr(Checkpoint, "load", lambda *a: pytest.fail("--dry-run read tensor data"))
    code, out, err = run(["to-gguf", full_size_sparse, "--level", "all", "--minimal-metadata", "--dry-run",
                          "--json", "-o", full_size_sparse.parent / "out"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["level"] == "all" and report["policy"] == "city96" and report["written"] is False
    sizes = {f["level"]: f["bytes"] for f in report["files"]}
    assert list(sizes) == list(policy.LEVELS)
    assert sizes["BF16"] == 40_872_114_720 and sizes["Q4_K_S"] == 12_140_608_032
    assert sizes["Q3_K_M"] == 9_679_567_392 and sizes["Q3_K_S"] == 8_952_609_312 and sizes["Q2_K"] == 7_062_518_304
    assert report["bytes"] == sum(sizes.values())
    q2 = report["files"][-1]
    assert len(q2["tensors"]) == 1933 and q2["tensors"]["transformer_blocks.59.attn.to_v.weight"] == "Q4_K"
    assert q2["roles"]["img_v"] == {"Q3_K": 58, "Q4_K": 2} and q2["metadata"] == {}
    assert not (full_size_sparse.parent / "out").exists()


def test_dry_run_text_and_json_match_the_written_file(small_model, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    code, text, err = run(["to-gguf", small_model, "--level", "Q5_0", "-o", out, "--dry-run"], capsys)
    assert code == 0, err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "img_mlp_down  2 Q5_1" in text and "img_mlp_up    2 Q5_0" in text and "bytes" in text
    code, js, _ = run(["to-gguf", small_model, "--level", "q5_0", "-o", out, "--dry-run", "--json"], capsys)
    plan = json.loads(js)
    assert {"level", "policy", "bytes", "tensors"} <= set(plan) and plan["level"] == "Q5_0"
    code, text, err = run(["to-gguf", small_model, "--level", "Q5_0", "-o", out], capsys)
    assert code == 0, err
    assert out.stat().st_size == plan["bytes"]
    assert "ComfyUI/models/diffusion_models" in text and "from_single_file" in text


def test_help_lists_every_level_and_policy(capsys):
    code, out, _ = run(["to-gguf", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    assert ", ".join(policy.LEVELS) + ", all, or a list" in text
    assert "[city96|quantstack|uniform|measured]" in text
    assert tuple(policy.POLICIES) == ("city96", "quantstack", "uniform")  # the fixed ones; measured runs the model


def test_bad_level_and_outputs(tiny_model, tmp_path, capsys):
    code, _, err = run(["to-gguf", tiny_model, "--level", "Q7_K"], capsys)
    assert code == 2 and "unknown GGUF level 'Q7_K'" in err and "Q4_K_M" in err, "a bad option value is a usage error"
    assert_one_line_error(*run(["to-gguf", tiny_model, "--level", "all", "-o", tmp_path / "x.gguf", "--dry-run"],
                         capsys)[::2], "give a folder")
    assert_one_line_error(*run(["to-gguf", tiny_model, "--level", "Q8_0", "-o", tmp_path / "x.bin", "--dry-run"],
                         capsys)[::2], ".gguf")
    if not torch.cuda.is_available():
        assert_one_line_error(*run(["to-gguf", tiny_model, "--level", "Q8_0", "-o", tmp_path / "x.gguf", "--device",
                              "cuda"], capsys)[::2], "no CUDA device")
        assert list(tmp_path.iterdir()) == []


def test_output_paths(tmp_path):
    assert writer.output_paths("qwen-image", ["Q4_K_M"], None) == [Path("qwen-image-Q4_K_M.gguf")]
    assert writer.output_paths("m", ["Q8_0"], tmp_path) == [tmp_path / "m-Q8_0.gguf"]  # an existing folder
    assert writer.output_paths("m", ["Q8_0"], Path("x/y.gguf")) == [Path("x/y.gguf")]
    assert writer.output_paths("m", ["Q8_0", "Q2_K"], Path("d")) == [Path("d/m-Q8_0.gguf"), Path("d/m-Q2_K.gguf")]
    with pytest.raises(QConvertError):
        writer.output_paths("m", ["Q8_0", "Q2_K"], Path("d.gguf"))


def _damaged_copy(tiny_single_file, path, name, value):
    from safetensors.torch import load_file

    tensors = load_file(tiny_single_file)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = value
    write_safetensors(path, tensors)
    return path


def test_nan_is_an_error_naming_the_tensor_and_leaves_no_file(tiny_single_file, tmp_path, capsys):
    src = _damaged_copy(tiny_single_file, tmp_path / "src" / "nan.safetensors", "img_in.weight", float("nan"))
    out = tmp_path / "out"
    assert_one_line_error(*run(["to-gguf", src, "--level", "all", "-o", out], capsys)[::2], "img_in.weight", "NaN")
    assert not any(out.iterdir())


def test_f16_range_is_checked(tiny_single_file, tmp_path, capsys):
    name = "transformer_blocks.0.attn.add_k_proj.weight"  # the first block linear in file order
    src = _damaged_copy(tiny_single_file, tmp_path / "src" / "big.safetensors", name, 70000.0)
    out = tmp_path / "out"
    assert_one_line_error(*run(["to-gguf", src, "--level", "F16", "-o", out / "x.gguf"], capsys)[::2], name, "F16 range")
    assert_one_line_error(*run(["to-gguf", src, "--level", "all", "-o", out], capsys)[::2], name, "F16 range")
    assert not any(out.iterdir())
    code, _, err = run(["to-gguf", src, "--level", "BF16", "-o", out / "ok.gguf", "-q"], capsys)
    assert code == 0, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_writes_the_same_bytes(written, tmp_path):
    source, plans, paths, _ = written
    cuda_paths = [tmp_path / p.name for p in paths]
    writer.write_gguf(source._source, plans, cuda_paths, device="cuda", quiet=True)
    for a, b in zip(paths, cuda_paths):
        assert sha256(a) == sha256(b), a.name


@pytest.mark.slow
def test_demo_step(tiny_model, tmp_path):
    lines = []
    from qconvert.converters import gguf as gguf_converter

    paths = gguf_converter.demo_step(tiny_model, tmp_path, True, lines.append)
    assert [p.name for p in paths] == ["tiny-qwen-image-Q8_0.gguf", "tiny-qwen-image-Q4_K_M.gguf"]
    assert all(p.is_file() for p in paths)
    text = "\n".join(lines)
    assert "Unet Loader (GGUF)" in text and "GGUFQuantizationConfig" in text


def test_a_list_of_levels_reads_the_source_once(small_model, tmp_path, capsys):
    code, js, err = run(["to-gguf", small_model, "--level", "q8_0,Q4_K_M", "-o", tmp_path, "--dry-run", "--json"],
                        capsys)
    assert code == 0, err
    plan = json.loads(js)
    assert plan["level"] == "Q8_0,Q4_K_M" and [f["level"] for f in plan["files"]] == ["Q8_0", "Q4_K_M"]
    for bad in ("Q8_0,Q8_0", "Q8_0,all", "Q8_0,Q9"):
        code, _, err = run(["to-gguf", small_model, "--level", bad, "-o", tmp_path, "--dry-run"], capsys)
        assert code == 2 and "level" in err, err
