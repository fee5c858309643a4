"""Reading sources: every layout, prefix stripping, and every malformed input as one clear error."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from qconvert.core.checkpoint import INDEX_NAME, open_checkpoint, read_safetensors_header
from qconvert.core.errors import CheckpointError
from qconvert.core.io import write_safetensors
from qconvert.core.models import qwen_image as qi


def copy_model(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def shards(model):
    return sorted((model / "transformer").glob("*.safetensors"))


def test_diffusers_folder(tiny_model):
    ckpt = open_checkpoint(tiny_model)
    assert ckpt.layout == "diffusers"
    assert ckpt.config.num_layers == 3 and ckpt.config.inner_dim == 256
    assert list(ckpt.tensors) == sorted(qi.expected_shapes(ckpt.config))
    assert ckpt.variant == "qwen-image"
    assert ckpt.name == "tiny-qwen-image"
    w = ckpt.load("transformer_blocks.1.attn.to_q.weight")
    assert w.dtype == torch.bfloat16 and tuple(w.shape) == (256, 256)


def test_transformer_folder_matches_diffusers_folder(tiny_model):
    a = open_checkpoint(tiny_model)
    b = open_checkpoint(tiny_model / "transformer")
    assert b.layout == "transformer-folder"
    assert b.name == "tiny-qwen-image"
    assert a.shapes() == b.shapes()
    name = "transformer_blocks.2.img_mod.1.weight"
    assert torch.equal(a.load(name), b.load(name))


def test_single_file_and_config_inference(tiny_model, tiny_single_file):
    ckpt = open_checkpoint(tiny_single_file)
    assert ckpt.layout == "single-file" and ckpt.config_source == "inferred from shapes"
    assert ckpt.config == open_checkpoint(tiny_model).config


def test_comfy_prefix_is_stripped_and_other_components_ignored(tmp_path, tiny_model):
    src = open_checkpoint(tiny_model)
    tensors = {f"model.diffusion_model.{n}": src.load(n) for n in src.names()}
    tensors["vae.decoder.conv_in.weight"] = torch.zeros(4, 4)
    tensors["text_encoders.qwen25_7b.transformer.model.norm.weight"] = torch.ones(8)
    path = tmp_path / "full-checkpoint.safetensors"
    write_safetensors(path, tensors)
    ckpt = open_checkpoint(path)
    assert set(ckpt.names()) == set(src.names())
    name = "transformer_blocks.0.attn.to_v.weight"
    assert torch.equal(ckpt.load(name), src.load(name))


def test_sparse_full_size_counts(full_size_sparse):
    ckpt = open_checkpoint(full_size_sparse)
    assert len(ckpt.tensors) == 1933
    assert ckpt.parameter_count == 20_430_401_088
    assert len(ckpt.files()) == 9
    assert ckpt.config == qi.QwenImageConfig()
    blocks = sum(f.stat().st_blocks for f in ckpt.files()) * 512
    assert blocks < 16 * 1024 * 1024, "the sparse model must not occupy real disk"
    assert sum(f.stat().st_size for f in ckpt.files()) > 40_860_000_000


def test_variants(tmp_path):
    from qconvert.core.tiny import make_tiny, make_tiny_single_file

    assert open_checkpoint(make_tiny(tmp_path / "e", layers=1, variant="edit-2511")).variant == "qwen-image-edit-2511"
    single = open_checkpoint(make_tiny_single_file(tmp_path / "e.safetensors", layers=1, variant="edit-2511"))
    assert qi.MARKER_EDIT_2511 in single.tensors and single.variant == "qwen-image-edit-2511"
    layered = open_checkpoint(make_tiny(tmp_path / "l", layers=1, variant="layered"))
    assert qi.ADDITION_T_EMBEDDING in layered.tensors and layered.variant == "qwen-image-layered"


# ------------------------------------------------------------ bad input

def test_truncated_shard(tmp_path, tiny_model):
    model = copy_model(tiny_model, tmp_path)
    shard = shards(model)[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(model)


def test_corrupted_json_header(tmp_path, tiny_model):
    model = copy_model(tiny_model, tmp_path)
    shard = shards(model)[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"{{{{"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        open_checkpoint(model)


def test_header_length_of_one_terabyte(tmp_path, tiny_model):
    model = copy_model(tiny_model, tmp_path)
    shard = shards(model)[0]
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header length field"):
        open_checkpoint(model)


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_overlapping_offsets(tmp_path, tiny_model):
    model = copy_model(tiny_model, tmp_path)
    shard = shards(model)[0]

    def overlap(header):
        keys = [k for k in header if k != "__metadata__"]
        a, b = header[keys[0]], header[keys[1]]
        size = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]

    _rewrite_header(shard, overlap)
    with pytest.raises(CheckpointError, match="overlap"):
        open_checkpoint(model)


def test_shape_inconsistent_with_byte_size(tmp_path, tiny_model):
    model = copy_model(tiny_model, tmp_path)
    shard = shards(model)[0]

    def grow(header):
        key = next(k for k in header if k != "__metadata__")
        header[key]["shape"] = [s * 2 for s in header[key]["shape"]]

    _rewrite_header(shard, grow)
    with pytest.raises(CheckpointError, match="data_offsets"):
        open_checkpoint(model)


def test_unknown_dtype(tmp_path, tiny_model):
    model = copy_model(tiny_model, tmp_path)

    def bad_dtype(header):
        key = next(k for k in header if k != "__metadata__")
        header[key]["dtype"] = "Q4_K"

    _rewrite_header(shards(model)[0], bad_dtype)
    with pytest.raises(CheckpointError, match="unknown dtype"):
        open_checkpoint(model)


def test_index_naming_a_missing_shard(tmp_path, tiny_model):
    model = copy_model(tiny_model, tmp_path)
    shards(model)[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(model)


def test_index_not_matching_shards(tmp_path, tiny_model):
    model = copy_model(tiny_model, tmp_path)
    index_path = model / "transformer" / INDEX_NAME
    index = json.loads(index_path.read_text())
    first = shards(model)[0].name
    key = next(k for k, v in index["weight_map"].items() if v != first)
    index["weight_map"][key] = first
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index"):
        open_checkpoint(model)


def test_index_path_traversal_is_refused(tmp_path, tiny_model):
    model = copy_model(tiny_model, tmp_path)
    index_path = model / "transformer" / INDEX_NAME
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../../etc/passwd"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="invalid shard name"):
        open_checkpoint(model)


def test_duplicate_key_across_shards(tmp_path, tiny_model):
    model = copy_model(tiny_model, tmp_path)
    (model / "transformer" / INDEX_NAME).unlink()
    a, b = shards(model)
    for p in shards(model):
        p.unlink()
    src = open_checkpoint(tiny_model)
    names = src.names()
    write_safetensors(a, {n: src.load(n) for n in names[:60]})
    write_safetensors(b, {n: src.load(n) for n in names[59:]})
    index = {"weight_map": {**{n: a.name for n in names[:60]}, **{n: b.name for n in names[60:]}}}
    (model / "transformer" / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="both"):
        open_checkpoint(model)


def test_other_architecture(tmp_path):
    path = tmp_path / "flux.safetensors"
    write_safetensors(path, {"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4),
                             "single_blocks.0.linear1.weight": torch.zeros(4, 4)})
    with pytest.raises(CheckpointError, match="not a Qwen-Image transformer.*FLUX"):
        open_checkpoint(path)


def test_missing_tensor(tmp_path, tiny_model):
    src = open_checkpoint(tiny_model)
    path = tmp_path / "incomplete.safetensors"
    write_safetensors(path, {n: src.load(n) for n in src.names() if n != "transformer_blocks.1.attn.to_k.weight"})
    with pytest.raises(CheckpointError, match="missing tensor.*transformer_blocks.1.attn.to_k.weight"):
        open_checkpoint(path)


def test_unexpected_tensor_needs_allow_extra(tmp_path, tiny_model):
    src = open_checkpoint(tiny_model)
    tensors = {n: src.load(n) for n in src.names()}
    tensors["transformer_blocks.0.lora_thing.weight"] = torch.zeros(2)
    path = tmp_path / "extra.safetensors"
    write_safetensors(path, tensors)
    with pytest.raises(CheckpointError, match="--allow-extra"):
        open_checkpoint(path)
    assert open_checkpoint(path, allow_extra=True).extra == ["transformer_blocks.0.lora_thing.weight"]


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(path)


def test_pickle_disguised_as_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="pickle"):
        read_safetensors_header(path)


def test_folder_of_pickles(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(folder)


def test_quantized_file_is_not_a_source(tmp_path, tiny_model):
    src = open_checkpoint(tiny_model)
    tensors = {n: src.load(n) for n in src.names()}
    tensors["transformer_blocks.0.attn.to_q.weight"] = tensors["transformer_blocks.0.attn.to_q.weight"].to(
        torch.float8_e4m3fn)
    path = tmp_path / "fp8.safetensors"
    write_safetensors(path, tensors)
    with pytest.raises(CheckpointError, match="already quantized"):
        open_checkpoint(path)


def test_hub_repo_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        open_checkpoint("Qwen/Qwen-Image")


def test_hub_repo_from_cache(tmp_path, monkeypatch, tiny_model):
    """A repo id resolves through huggingface_hub's cache (transformer files only)."""
    import huggingface_hub

    seen = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        seen["repo"], seen["patterns"] = repo_id, allow_patterns
        return str(tiny_model)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    ckpt = open_checkpoint("Qwen/Qwen-Image")
    assert seen["repo"] == "Qwen/Qwen-Image"
    assert all(p.startswith(("model_index", "transformer/")) for p in seen["patterns"])
    assert len(ckpt.tensors) == 109
    assert ckpt.name == "qwen-image", "outputs are named after the repo, not the cache's snapshot hash"
    assert ckpt.provenance()["source"] == "Qwen/Qwen-Image"


def test_gguf_where_safetensors_is_expected(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(64))
    with pytest.raises(CheckpointError, match="GGUF file, not safetensors"):
        read_safetensors_header(path)


def test_load_into_recycled_buffers_reads_the_same_tensors(tiny_model):
    from qconvert.core.pipeline import BufferRing

    ckpt = open_checkpoint(tiny_model)
    ring = BufferRing(2)
    names = ckpt.names()[:6]
    for name in names:
        got = ckpt.load_into(name, ring)
        assert got.dtype == ckpt.load(name).dtype and torch.equal(got, ckpt.load(name)), name
    first = ring.take(4)
    assert ring.take(4).data_ptr() != first.data_ptr() and ring.take(4).data_ptr() == first.data_ptr()
