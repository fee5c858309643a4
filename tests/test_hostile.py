"""Hostile input: every class the fuzzer found, as a minimal regression test.

Each case is one crafted file given to the CLI (one ``error:`` line naming
what is wrong, exit 1) and to the Python API (a ``QConvertError``).  Each
runs under ``bounded``: a hang guard far above the milliseconds a refusal
takes, and a cap on the Python memory it may allocate, so a case that
starts doing work proportional to a number in the file fails here.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch

from qconvert.core import tiny
from qconvert.core.checkpoint import INDEX_NAME, open_checkpoint, read_safetensors_header
from qconvert.core.errors import CheckpointError, QConvertError
from qconvert.core.io import write_safetensors
from qconvert.core.lora import with_loras
from qconvert.formats.comfyui.loader import iter_dequantized, load_dequantized
from qconvert.formats.gguf.reader import check_header, open_gguf
from qconvert.formats.inspection import inspect_path

from .cli_helpers import assert_one_line_error, run

# A hang guard, not a timing: refusals take milliseconds, but the largest legal header (100,000 tensors)
# takes about 20 s to check under tracemalloc on 2 busy cores; work that grows with a number from the file
# would take hours.
GUARD_S = 120
LAYER = "transformer_blocks.0.attn.to_q"
MAX_PY_MB = 300


@contextlib.contextmanager
def bounded():
    def hung(*_):
        raise AssertionError(f"still running after {GUARD_S} s: work grows with a number from the file")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(GUARD_S)
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        assert peak < MAX_PY_MB, f"allocated {peak:.0f} MB of Python objects"
    finally:
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def short_id(value) -> str | None:
    """Test ids from short strings only (some cases hold megabytes of brackets)."""
    return None if isinstance(value, str) and len(value) < 40 else ""


def raw_safetensors(path: Path, header: bytes | str | dict, body: bytes = b"") -> Path:
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    return path


def refused(args, capsys, *patterns):
    """The CLI refuses with one line naming each pattern."""
    with bounded():
        code, _, err = run(args, capsys)
    assert_one_line_error(code, err, *patterns)
    err.encode("ascii")  # escaped: nothing from the file reaches the terminal raw
    return err


def api_refuses(fn, *patterns):
    with bounded(), pytest.raises(QConvertError) as exc:
        fn()
    str(exc.value).encode("utf-8")
    for p in patterns:
        assert p in str(exc.value), str(exc.value)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return tiny.make_tiny(tmp_path_factory.mktemp("hostile") / "m", layers=1, heads=2, head_dim=16, text_dim=32)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    return tiny.make_tiny_single_file(tmp_path_factory.mktemp("hostile") / "m.safetensors", layers=1, heads=2,
                                      head_dim=16, text_dim=32)


def copy(model: Path, tmp_path: Path) -> Path:
    dst = tmp_path / model.name
    shutil.copytree(model, dst)
    return dst


def edit_header(src: Path, dst: Path, edit) -> Path:
    """A copy of a safetensors file with its header JSON changed by ``edit(dict)`` (data kept)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    return raw_safetensors(dst, json.dumps(header, ensure_ascii=True), raw[8 + n:])


# ------------------------------------------------- JSON in hostile shapes

@pytest.mark.parametrize("header, pattern", ids=short_id, argvalues=[
    ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ('{"a": ' + "[" * 50 + "]" * 50 + "}", "nested more than 16 deep"),
    ('{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 1' + "0" * 5000 + "]}}", "integer of"),
    ('{"a": {"dtype": ["F32"], "shape": [], "data_offsets": [0, 4]}}', "unknown dtype"),
    ('{"a": {"dtype": {"x": 1}, "shape": [], "data_offsets": [0, 4]}}', "unknown dtype"),
    ('{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', "NaN is not a JSON number"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "appears twice"),
    ('{"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}', "malformed shape"),
    ('{"__metadata__": {"k": ["v"]}}', "__metadata__ must map strings to strings"),
    ('{"__metadata__": 0}', "__metadata__ must map strings to strings"),  # the library refuses it (fuzz finding)
    ('{"__metadata__": []}', "__metadata__ must map strings to strings"),
    # anywhere, even in a field qconvert ignores: the safetensors library refuses the header (found by the
    # differential fuzz target)
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x\\ud800": 1}}', "not valid Unicode"),
])
def test_header_json_shapes(tmp_path, capsys, header, pattern):
    path = raw_safetensors(tmp_path / "x.safetensors", header, b"\0" * 4)
    refused(["inspect", path], capsys, pattern)
    api_refuses(lambda: read_safetensors_header(path), pattern)


@pytest.mark.parametrize("field, value, pattern", ids=short_id, argvalues=[
    ("num_layers", "1", "num_layers must be an integer, not a string"),
    ("num_layers", 10 ** 9, "num_layers is 1000000000; it must be between 1 and 1,024"),
    ("num_attention_heads", [2], "num_attention_heads must be an integer, not a list"),
    ("axes_dims_rope", 16, "axes_dims_rope must be a list of three dimensions"),
    ("axes_dims_rope", [2, 7, 8], "must add up to attention_head_dim 16"),
    ("zero_cond_t", "yes", "zero_cond_t must be true or false"),
    ("attention_head_dim", 2 ** 40, "attention_head_dim is 1099511627776"),
])
def test_config_fields(tmp_path, capsys, small_model, field, value, pattern):
    model = copy(small_model, tmp_path)
    path = model / "transformer" / "config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    refused(["to-gguf", model, "--level", "Q8_0", "--dry-run"], capsys, "config.json", pattern)
    api_refuses(lambda: open_checkpoint(model), pattern)


@pytest.mark.parametrize("text, pattern", ids=short_id, argvalues=[
    ("[" * 100000, "JSON objects/lists, more than the 1,024"),
    ("[" * 1000 + "]" * 1000, "nested"),
    ('{"num_layers": 1' + "0" * 10000 + "}", "integer of 10,001 digits"),
    ('"just a string"', "not a JSON object"),
    ('{"_class_name": ["QwenImageTransformer2DModel"]}', "_class_name must be a string"),
])
def test_config_documents(tmp_path, capsys, small_model, text, pattern):
    model = copy(small_model, tmp_path)
    (model / "transformer" / "config.json").write_text(text)
    refused(["inspect", model], capsys, "config.json", pattern)


@pytest.mark.parametrize("edit, pattern", ids=short_id, argvalues=[
    (lambda index: index.update(weight_map=list(index["weight_map"])), "no weight_map object"),
    (lambda index: index["weight_map"].update({"img_in.weight": ["a.safetensors"]}), "invalid shard name"),
    (lambda index: index["weight_map"].update({"img_in.weight": "x" * 300 + ".safetensors"}), "invalid shard name"),
    (lambda index: index["weight_map"].update({"img_in.weight": "a\u0000.safetensors"}), "invalid shard name"),
    (lambda index: index["weight_map"].update({"img_in.weight": "config.json"}), "invalid shard name"),
])
def test_shard_index(tmp_path, capsys, small_model, edit, pattern):
    model = copy(small_model, tmp_path)
    path = model / "transformer" / INDEX_NAME
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))
    refused(["inspect", model], capsys, INDEX_NAME, pattern)
    api_refuses(lambda: open_checkpoint(model), pattern)


# ------------------------------------------- names and numbers that ask for work

def test_huge_block_index_in_a_single_file(tmp_path, capsys, small_file):
    def add(header):
        header["transformer_blocks.999999999.attn.to_q.weight"] = {"dtype": "BF16", "shape": [0],
                                                                    "data_offsets": [0, 0]}
    path = edit_header(small_file, tmp_path / "x.safetensors", add)
    refused(["to-fp8", path, "--dry-run"], capsys, "names a block beyond the 1024")
    api_refuses(lambda: open_checkpoint(path), "beyond the 1024")


def test_block_index_of_thousands_of_digits(tmp_path, capsys, small_file):
    name = "transformer_blocks." + "7" * 5000 + ".attn.to_q.weight"

    def add(header):
        header[name] = {"dtype": "BF16", "shape": [0], "data_offsets": [0, 0]}
    path = edit_header(small_file, tmp_path / "x.safetensors", add)
    err = refused(["inspect", path], capsys, "names a block beyond")
    assert len(err) < 2500
    api_refuses(lambda: open_checkpoint(path, allow_extra=True), "names a block beyond")


def test_empty_tensor_with_astronomical_dimensions(tmp_path, capsys):
    path = raw_safetensors(tmp_path / "x.safetensors",
                           {"a": {"dtype": "F32", "shape": [0, 2 ** 62, 2 ** 62], "data_offsets": [0, 0]}})
    refused(["inspect", path], capsys, "spans more than 2^48 elements")


def test_header_of_millions_of_empty_entries(tmp_path, capsys):
    entries = ",".join(f'"{i:x}":{{}}' for i in range(8_000_000))
    path = raw_safetensors(tmp_path / "x.safetensors", "{" + entries + "}")
    assert path.stat().st_size > 80e6
    refused(["inspect", path], capsys, "JSON objects/lists, more than")


def test_too_many_tensors(tmp_path, capsys):
    entries = ",".join(f'"t{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}' for i in range(100_001))
    path = raw_safetensors(tmp_path / "x.safetensors", "{" + entries + "}")
    refused(["inspect", path], capsys, "100,001 tensors, more than the 100,000")


# -------------------------------------------------- shapes that break inference

@pytest.mark.parametrize("name, shape, pattern", ids=short_id, argvalues=[
    ("transformer_blocks.0.attn.norm_q.weight", [], "has shape []; a Qwen-Image has 1 dimension(s) there"),
    ("img_in.weight", [32], "has shape [32]; a Qwen-Image has 2 dimension(s) there"),
    ("proj_out.weight", [64, 32, 1], "a Qwen-Image has 2 dimension(s) there"),
])
def test_shapes_that_break_config_inference(tmp_path, capsys, small_file, name, shape, pattern):
    def reshape(header):
        header[name]["shape"] = shape
    path = edit_header(small_file, tmp_path / "x.safetensors", reshape)
    # Byte counts no longer match the new shape: give the data a matching size.
    header = read_json_header(path)
    body = b"\0" * retile(header)
    raw_safetensors(path, json.dumps(header), body)
    refused(["inspect", path], capsys, name, pattern)
    api_refuses(lambda: open_checkpoint(path), pattern)


def read_json_header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def retile(header: dict) -> int:
    """Lay the data offsets out anew for the shapes; returns the data size."""
    at = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        n = {"BF16": 2, "F32": 4, "U8": 1}[entry["dtype"]]
        for s in entry["shape"]:
            n *= s
        entry["data_offsets"] = [at, at + n]
        at += n
    return at


# ------------------------------------------------------ text that cannot be printed

def test_lone_surrogate_in_a_tensor_name(tmp_path, capsys):
    path = raw_safetensors(tmp_path / "x.safetensors",
                           '{"a\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4)
    err = refused(["inspect", path], capsys, "not valid Unicode", "\\ud800")
    assert "a\\ud800" in err
    api_refuses(lambda: read_safetensors_header(path), "not valid Unicode")


def test_lone_surrogate_in_metadata(tmp_path, capsys):
    path = raw_safetensors(tmp_path / "x.safetensors", '{"__metadata__": {"k": "v\\udfff"}}')
    refused(["inspect", path], capsys, "the value of k", "v\\udfff is not valid Unicode")


def test_control_characters_in_names_are_escaped(tmp_path, capsys):
    path = raw_safetensors(tmp_path / "x.safetensors",
                           '{"\\u001b[31mred\\n": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4)
    err = refused(["inspect", path], capsys, "not a Qwen-Image transformer", "\\x1b[31mred\\n")
    assert "\x1b" not in err


def test_paths_that_are_not_utf8_reach_metadata_escaped(tmp_path, capsys, small_model):
    """A folder or LoRA whose name holds bytes that are not UTF-8 (surrogate escapes in Python)."""
    import os

    model = Path(os.fsdecode(os.fsencode(tmp_path) + b"/m\xff"))
    shutil.copytree(small_model, model)
    lora = tiny.make_tiny_lora(Path(os.fsdecode(os.fsencode(tmp_path) + b"/l\xfe.safetensors")), small_model, rank=2)
    with bounded():
        code, out, err = run(["to-gguf", model, "--level", "Q8_0", "--lora", lora, "-o", tmp_path / "o.gguf"], capsys)
    assert code == 0, err
    assert "m\\xff" in out  # the hints name the folder escaped, as the terminal can show it
    summary = inspect_path(tmp_path / "o.gguf")
    assert summary["metadata"]["qconvert.source"].endswith("m\\xff")
    assert json.loads(summary["metadata"]["qconvert.loras"])[0]["file"] == "l\\xfe.safetensors"
    with bounded():
        code, _, err = run(["to-fp8", model, "-o", tmp_path / "o.safetensors"], capsys)
    assert code == 0, err
    provenance = json.loads(read_safetensors_header(tmp_path / "o.safetensors").metadata["qconvert"])
    assert provenance["source"].endswith("m\\xff")


# --------------------------------------------------------------------- GGUF

def gguf(kvs: bytes = b"", n_kv: int = 0, tensors: bytes = b"", n_tensors: int = 0, data: bytes = b"",
         version: int = 3) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kvs + tensors
    return head + b"\0" * (-len(head) % 32) + data


def gstr(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize("data, pattern", ids=short_id, argvalues=[
    (gguf(gstr(b"k") + struct.pack("<IIQ", 9, 0, 2 ** 60), 1), "arrays hold more than 262,144 items"),
    (gguf(gstr(b"k") + struct.pack("<IIQ", 9, 8, 2 ** 40), 1), "arrays hold more than"),
    (gguf(gstr(b"k") + struct.pack("<IIQ", 9, 4, 1000), 1), "needs 4,000 more bytes but the file ends"),
    (gguf(gstr(b"k") + struct.pack("<I", 8) + struct.pack("<Q", 2 ** 62), 1), "more bytes but the file ends"),
    (gguf(struct.pack("<Q", 2 ** 63), 1), "more bytes but the file ends"),
    (gguf(n_tensors=2 ** 40), "tensors and 0 metadata keys, more than"),
    (gguf(gstr(b"k") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 0, 1) + b"x", 1), "array of arrays"),
    (gguf(gstr(b"k") + struct.pack("<I", 99), 1), "unknown value type 99"),
    (gguf(gstr(b"\xff\xfe") + struct.pack("<IB", 0, 1), 1), "not UTF-8"),
    (gguf(gstr(b"k") + struct.pack("<IB", 0, 1) + gstr(b"k") + struct.pack("<IB", 0, 1), 2), "appears twice"),
    (gguf(gstr(b"general.alignment") + struct.pack("<II", 4, 3), 1), "not a power of two"),
    (gguf(tensors=gstr(b"t") + struct.pack("<IQQIQ", 2, 2 ** 40, 2 ** 40, 0, 0), n_tensors=1), "more than 2^48"),
    (gguf(tensors=gstr(b"t") + struct.pack("<IQIQ", 1, 32, 1234, 0), n_tensors=1), "unknown type code 1234"),
    (gguf(tensors=gstr(b"t") + struct.pack("<IQIQ", 1, 33, 8, 0), n_tensors=1), "not a multiple of its type's block"),
    (gguf(tensors=gstr(b"t") + struct.pack("<IQIQ", 1, 4, 0, 64), n_tensors=1, data=b"\0" * 128),
     "starts at data offset 64 but ggml expects 0"),
    (gguf(tensors=gstr(b"t") + struct.pack("<IQIQ", 1, 1024, 0, 0), n_tensors=1, data=b"\0" * 16),
     "the file is truncated"),
    (gguf(tensors=gstr(b"t" * 64) + struct.pack("<IQIQ", 1, 32, 0, 0), n_tensors=1, data=b"\0" * 128),
     "is 64 bytes; ggml reads names shorter than 64"),
    (gguf(tensors=gstr(b"t") + struct.pack("<I5QIQ", 5, 1, 1, 1, 1, 1, 0, 0), n_tensors=1, data=b"\0" * 32),
     "has 5 dimensions (ggml allows at most 4)"),
    (gguf(tensors=gstr(b"t") + struct.pack("<IQIQ", 1, 1, 0, 0), n_tensors=1, data=b"\0" * 4),
     "and its padding end at byte 96 but the file has 68"),
    (gguf(tensors=gstr(b"t") + struct.pack("<IIQ", 0, 30, 0), n_tensors=1, data=b"\0" * 32),
     "has 0 dimensions and type BF16, which gguf-py"),  # found by the mutation replay
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0) + b"\0" * 8, "a big-endian GGUF file"),
    (gguf(gstr(b"") + struct.pack("<IB", 0, 1), 1), "a metadata key is empty"),  # found against ggml's loader
    (gguf(gstr(b"k") + struct.pack("<IIQ", 9, 0x55474700, 0), 1),
     "an array of unknown value type 1430734592"),  # an empty one: found against ggml's loader
    (gguf(gstr(b"general.alignment\0x") + struct.pack("<II", 4, 3), 1),
     "holds a NUL byte; ggml would read it as general.alignment"),  # found against ggml's loader
    (gguf(tensors=gstr(b"a\0b") + struct.pack("<IQIQ", 1, 1, 0, 0), n_tensors=1, data=b"\0" * 32),
     "tensor name a\\x00b holds a NUL byte"),
    (gguf(version=7), "GGUF version 7"),
    (b"GGUF\x03\x00", "too short for a GGUF header"),
])
def test_gguf_header(tmp_path, capsys, data, pattern):
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    refused(["inspect", path], capsys, pattern)
    api_refuses(lambda: open_gguf(path), pattern)


@pytest.mark.parametrize("name, shape, pattern", [
    ("extra.odd", (), "tensor extra.odd has 0 dimensions; qconvert writes GGUF tensors of 1 to 4"),
    ("extra.odd", (1, 2, 1, 2, 1), "tensor extra.odd has 5 dimensions; qconvert writes GGUF tensors of 1 to 4"),
    ("extra." + "x" * 60, (4,), "ggml reads GGUF tensor names shorter than 64 bytes"),
])
def test_to_gguf_refuses_extra_tensors_ggml_cannot_hold(tmp_path, capsys, small_file, name, shape, pattern):
    """An --allow-extra tensor of 0 or 5+ dimensions, or a name of 64+ bytes, used to be written into a
    GGUF that ggml (and qconvert's own reader) refuse; the plan refuses it now."""
    from safetensors.torch import load_file

    tensors = load_file(str(small_file))
    tensors[name] = torch.zeros(shape, dtype=torch.bfloat16)
    src = tmp_path / "x.safetensors"
    write_safetensors(src, tensors)
    out = tmp_path / "x.gguf"
    refused(["to-gguf", src, "--allow-extra", "--level", "Q8_0", "-o", out], capsys, pattern)
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))


@pytest.mark.parametrize("name", [f"{LAYER}.weight_scale", f"{LAYER}.comfy_quant", f"{LAYER}.scale_weight",
                                  "scaled_fp8", "other.input_scale"])
def test_to_fp8_refuses_extra_tensors_named_like_its_own(tmp_path, capsys, small_file, name):
    """Such an --allow-extra tensor used to collide with a planned scale (a corrupt file) or be read by
    ComfyUI as a layer config of a file that has none."""
    from safetensors.torch import load_file

    tensors = load_file(str(small_file))
    tensors[name] = torch.ones(1, dtype=torch.bfloat16)
    src = tmp_path / "x.safetensors"
    write_safetensors(src, tensors)
    for layout in ("comfy", "scaled", "plain"):
        out = tmp_path / f"{layout}.safetensors"
        refused(["to-fp8", src, "--allow-extra", "--format", layout, "-o", out], capsys,
                f"tensor {name} (from --allow-extra) has a name ComfyUI reads as a scale or layer config")
        assert not out.exists()


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["safetensors", "lora", "fp8"])
def test_every_safetensors_the_check_accepts_opens_in_the_library(tmp_path, name):
    """Differential: qconvert's header check against the safetensors library (same keys, metadata and
    bytes), on qconvert's own files and a thousand header-level mutations of them."""
    import random

    from fuzz import targets
    from fuzz.mutators import MUTATORS
    from fuzz.run import mutate

    pool = targets.seeds(name)
    rng = random.Random(17)
    accepted = 0
    path = tmp_path / "x.safetensors"
    for i in range(1000):
        data = pool[i] if i < len(pool) else MUTATORS[name](rng.choice(pool), 1 << 20, rng.randrange(2 ** 32),
                                                            lambda d, n: mutate(d, rng, pool)[:n])
        path.write_bytes(data)
        try:
            targets.library_agrees(path)
        except QConvertError:
            continue
        accepted += 1
    assert accepted > 50  # the mutations must reach files both accept


@pytest.mark.oracle
def test_every_gguf_the_check_accepts_loads_in_ggml(tmp_path):
    """Differential: qconvert's header check against ggml's own gguf_init_from_file, on qconvert's
    GGUF files and a few thousand field-level mutations of them."""
    import random

    from fuzz import targets
    from fuzz.mutators import MUTATORS
    from fuzz.run import mutate

    from .ggml_oracle import gguf_loader

    ggml, why = gguf_loader()
    if ggml is None:
        pytest.skip(why)
    pool = targets.seeds("gguf")
    rng = random.Random(11)
    accepted = 0
    path = tmp_path / "x.gguf"
    for i in range(1500):
        data = pool[i] if i < len(pool) else MUTATORS["gguf"](rng.choice(pool), 1 << 20, rng.randrange(2 ** 32),
                                                              lambda d, n: mutate(d, rng, pool)[:n])
        path.write_bytes(data)
        try:
            check_header(path)
        except QConvertError:
            continue
        accepted += 1
        assert ggml.loads(path), f"input {i}: qconvert accepts a GGUF that ggml refuses"
    assert accepted > 100  # the mutations must reach files both accept


@pytest.mark.parametrize("n_kv, n_tensors, pattern", [
    # the most it reads: checked, then read by gguf-py (seconds, more under tracemalloc)
    pytest.param(4096, 16384, "not a Qwen-Image transformer: 16384 tensors", marks=pytest.mark.slow),
    (4097, 0, "0 tensors and 4,097 metadata keys, more than qconvert reads"),
    (0, 16385, "16,385 tensors and 0 metadata keys, more than qconvert reads"),
])
def test_gguf_counts_are_bounded(tmp_path, capsys, n_kv, n_tensors, pattern):
    """gguf-py spends ~0.1 ms per key or tensor in Python: the bounds keep inspect to seconds."""
    kvs = b"".join(gstr(f"k{i:06d}".encode()) + struct.pack("<IB", 0, 1) for i in range(n_kv))
    infos = b"".join(gstr(f"t{i:06d}".encode()) + struct.pack("<IQIQ", 1, 1, 0, 32 * i) for i in range(n_tensors))
    path = tmp_path / "x.gguf"
    path.write_bytes(gguf(kvs, n_kv, infos, n_tensors, data=b"\0" * (32 * n_tensors)))
    refused(["inspect", path], capsys, pattern)


def test_gguf_scalar_tensor_reads_as_ggml_reads_it(tmp_path):
    """ggml takes missing dimensions as 1: a 0-dimension F32 tensor is one value."""
    path = tmp_path / "x.gguf"
    path.write_bytes(gguf(tensors=gstr(b"t") + struct.pack("<IIQ", 0, 0, 0), n_tensors=1, data=b"\0" * 32))
    assert check_header(path).tensors[0].nbytes == 4
    assert open_gguf(path).tensors[0].n_elements == 1


def test_gguf_written_by_qconvert_passes_the_check(tmp_path, small_model):
    from qconvert.formats.gguf import writer

    with open_checkpoint(small_model) as src:
        plans = writer.plan_files(src, ["Q4_K_M"], policy="city96")
        path = tmp_path / "m.gguf"
        writer.write_gguf(src, plans, [path], quiet=True)
    header = check_header(path)
    assert len(header.tensors) == len(open_gguf(path).tensors) == len(src.tensors)


# --------------------------------------------------------------------- LoRA

@pytest.mark.parametrize("damage, pattern", ids=short_id, argvalues=[
    (lambda raw: raw + b"trailing", "bytes follow the last tensor's data"),
    ("gap", "leaves a gap of 4 bytes"),
])
def test_lora_files_the_safetensors_library_refuses(tmp_path, capsys, small_model, damage, pattern):
    lora = tiny.make_tiny_lora(tmp_path / "l.safetensors", small_model, rank=2)
    if damage == "gap":
        header = read_json_header(lora)
        for entry in header.values():
            entry["data_offsets"] = [o + 4 for o in entry["data_offsets"]] if entry["data_offsets"][0] else \
                entry["data_offsets"]
        raw = lora.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        first = min(e["data_offsets"][1] for e in header.values() if e["data_offsets"][0] == 0)
        raw_safetensors(lora, json.dumps(header), raw[8 + n:8 + n + first] + b"\0" * 4 + raw[8 + n + first:])
    else:
        lora.write_bytes(damage(lora.read_bytes()))
    refused(["bake-lora", small_model, "--lora", lora, "--dry-run"], capsys, "l.safetensors", pattern)
    api_refuses(lambda: with_loras(open_checkpoint(small_model), [lora]), pattern)


def test_lora_rank_beyond_full_rank(tmp_path, capsys, small_model):
    lora = tiny.make_tiny_lora(tmp_path / "l.safetensors", small_model, rank=40, targets=["attn"])
    refused(["bake-lora", small_model, "--lora", lora, "--dry-run"], capsys, "rank 40 exceeds the layer's full rank 32")


# ---------------------------------------------------------------------- FP8

@pytest.fixture(scope="module")
def fp8_file(tmp_path_factory, small_model):
    from qconvert.formats.comfyui import fp8

    out = tmp_path_factory.mktemp("fp8") / "m.safetensors"
    with open_checkpoint(small_model) as src:
        fp8.convert(src, out, fp8.make_options("comfy"), quiet=True)
    return out


def fp8_variant(fp8_file: Path, tmp_path: Path, tensors: dict, metadata=None, drop=()) -> Path:
    """The FP8 file with some tensors replaced (and metadata set), rewritten properly."""
    from safetensors import safe_open

    with safe_open(str(fp8_file), "pt") as f:
        all_tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    all_tensors.update(tensors)
    path = tmp_path / "v.safetensors"
    write_safetensors(path, all_tensors, metadata)
    return path


@pytest.mark.parametrize("tensors, metadata, pattern", ids=short_id, argvalues=[
    ({f"{LAYER}.weight_scale": torch.ones(3)}, None, "a per-tensor scale must be one float, not F32 [3]"),
    ({f"{LAYER}.weight_scale": torch.tensor(float("nan"))}, None, "finite, non-negative"),
    ({f"{LAYER}.weight_scale": torch.ones((), dtype=torch.int32)}, None, "must be one float, not I32"),
    ({f"{LAYER}.comfy_quant": torch.ones(4)}, None, "a layer config must be U8 bytes of JSON"),
    ({f"{LAYER}.comfy_quant": torch.tensor(list(b'{"format": ["x"]}'), dtype=torch.uint8)}, None,
     "format must be a string, not a list"),
    ({f"{LAYER}.comfy_quant": torch.tensor(list(b'{"format": {"a": 1}}'), dtype=torch.uint8)}, None,
     "format must be a string, not an object"),
    ({f"{LAYER}.comfy_quant": torch.tensor(list(b'[1, 2]'), dtype=torch.uint8)}, None,
     "a layer config must be a JSON object"),
    ({f"{LAYER}.comfy_quant": torch.tensor(list(b'{"format": "\\ud800"}'), dtype=torch.uint8)}, None,
     "not valid Unicode"),
    ({}, {"_quantization_metadata": '{"layers": ["a"]}'}, "must be an object with a \"layers\" object"),
    ({}, {"_quantization_metadata": '{"layers": {"a": "float8"}}'}, "a layer config must be a JSON object"),
    ({}, {"_quantization_metadata": "[" * 10000}, "nested too deeply"),
])
def test_fp8_loader(tmp_path, capsys, fp8_file, tensors, metadata, pattern):
    path = fp8_variant(fp8_file, tmp_path, tensors, metadata)
    refused(["inspect", path], capsys, pattern)
    api_refuses(lambda: load_dequantized(path), pattern)
    api_refuses(lambda: list(iter_dequantized(path)), pattern)


@pytest.mark.parametrize("drop, pattern", [
    (f"{LAYER}.weight_scale", "has no weight_scale tensor"),
    (f"{LAYER}.weight", "has a comfy_quant config but no weight tensor"),
])
def test_fp8_loader_missing_tensors(tmp_path, capsys, fp8_file, drop, pattern):
    path = fp8_variant(fp8_file, tmp_path, {}, drop=[drop])
    refused(["inspect", path], capsys, LAYER)  # inspect may see the missing model weight first
    api_refuses(lambda: load_dequantized(path), pattern)


def test_fp8_scaled_layout_checks(tmp_path, capsys, small_model):
    from qconvert.formats.comfyui import fp8

    out = tmp_path / "s.safetensors"
    with open_checkpoint(small_model) as src:
        fp8.convert(src, out, fp8.make_options("scaled"), quiet=True)
    bad = fp8_variant(out, tmp_path, {f"{LAYER}.scale_weight": torch.tensor(-2.0)})
    refused(["inspect", bad], capsys, f"{LAYER}.scale_weight", "finite, non-negative")
    api_refuses(lambda: load_dequantized(bad), "finite, non-negative")
    assert inspect_path(out)["layer_formats"] == {"scaled float8_e4m3fn": 20}  # 14 block and 6 top-level linears
    orphan = fp8_variant(out, tmp_path, {}, drop=[f"{LAYER}.weight"])  # found by the fuzzer
    refused(["inspect", orphan], capsys, LAYER)
    api_refuses(lambda: load_dequantized(orphan), f"{LAYER}.scale_weight: scales {LAYER}.weight, which the file "
                "does not have")
    # names outside the model (an absurd block index) are an error there as in the CLI, not a silent key
    absurd = fp8_variant(out, tmp_path, {"transformer_blocks.999999.attn.to_q.weight": torch.zeros(4, 4)})
    api_refuses(lambda: load_dequantized(absurd),
                "transformer_blocks.999999.attn.to_q.weight is not part of Qwen-Image")
    assert "transformer_blocks.999999.attn.to_q.weight" in load_dequantized(absurd, allow_extra=True)


def test_public_api_errors_are_qconvert_errors():
    assert issubclass(CheckpointError, QConvertError)


def test_inspect_still_reads_every_output(tmp_path, small_model, fp8_file):
    assert inspect_path(small_model)["tensors"] > 0
    summary = inspect_path(fp8_file)
    assert summary["format"].startswith("safetensors, ComfyUI")
    assert summary["layer_formats"] == {"float8_e4m3fn": 14}
