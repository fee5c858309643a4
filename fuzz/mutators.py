"""Structure-aware mutation for safetensors inputs.

libFuzzer's byte mutations almost always break a safetensors file's length
prefix or its tiling, so they test the first two checks and little else.
These mutators edit the JSON header as text (with libFuzzer's own mutator),
then often repair what makes a file structurally valid (the length prefix,
and data offsets recomputed from the mutated dtypes and shapes), so inputs
reach the model map, the LoRA resolver and the FP8 loader.
"""

from __future__ import annotations

import copy
import json
import random
import struct

from fuzz.targets import PART

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
             "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MAX_BODY = 1 << 20


def split(data: bytes):
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        return None
    return data[8:8 + n], data[8 + n:]


def retile(header: bytes, body: bytes) -> bytes | None:
    """Offsets laid out anew for the header's own dtypes and shapes; the body resized to match."""
    try:
        obj = json.loads(header)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    at = 0
    for key, entry in obj.items():
        if key == "__metadata__" or not isinstance(entry, dict):
            continue
        shape, dtype = entry.get("shape"), entry.get("dtype")
        size = _ITEMSIZE.get(dtype, 1) if isinstance(dtype, str) else 1
        if isinstance(shape, list) and all(isinstance(s, int) and 0 <= s < 1 << 20 for s in shape):
            for s in shape:
                size *= s
        else:
            size = 0
        if at + size > MAX_BODY:
            return None
        entry["data_offsets"] = [at, at + size]
        at += size
    raw = json.dumps(obj, separators=(",", ":")).replace("\\\\ud800", "\\ud800").encode()
    raw += b" " * (-len(raw) % 8)
    body = (body * (at // max(len(body), 1) + 1))[:at] if body else bytes(at)
    return struct.pack("<Q", len(raw)) + raw + body


_NAMES = ["img_in.weight", "txt_in.weight", "proj_out.weight", "txt_norm.weight",
          "transformer_blocks.0.attn.norm_q.weight", "transformer_blocks.0.attn.to_q.weight",
          "transformer_blocks.1.attn.to_q.weight", "transformer_blocks.0.attn.to_q.lora_up.weight",
          "transformer_blocks.0.attn.to_q.lora_down.weight", "transformer_blocks.0.attn.to_q.alpha",
          "transformer_blocks.0.attn.to_q.weight_scale", "transformer_blocks.0.attn.to_q.comfy_quant",
          "transformer_blocks.0.attn.to_q.scale_weight", "transformer_blocks.0.attn.to_q.weight_s_rel",
          "transformer_blocks.0.attn.to_q.weight_codebook", "scaled_fp8", "__index_timestep_zero__",
          "transformer_blocks.99999.attn.to_q.weight", "model.diffusion_model.img_in.weight",
          "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight", "_quantization_metadata",
          "\ud800", "weight_map", "num_layers", "attention_head_dim", "axes_dims_rope", "layers", "format",
          "prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds", "negative_prompt_embeds_mask",
          "noise", "image_latents"]
_VALUES = [0, 1, -1, 2, 3, 16, 32, 448, 2 ** 31, 2 ** 32, 2 ** 48, 2 ** 63, 10 ** 30, 0.5, 1e308, True, False, None,
           "", "BF16", "F32", "U8", "F8_E4M3", "I64", "BOOL", "float8_e4m3fn", "nvfp4", "asym_w4a8_int8", "\ud800",
           "x" * 300,
           [], {}, [0], [1, 2], [0, 2 ** 62], [16, 7, 7], [[]], {"format": "float8_e4m3fn"}, {"layers": {}},
           "diffusion_pytorch_model-00001-of-00002.safetensors", "../x.safetensors", "QwenImageTransformer2DModel"]


def mutate_tree(value, rng: random.Random):
    """One edit somewhere in a parsed JSON value: replace, delete, duplicate, rename, nest."""
    containers = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (dict, list)) and len(containers) < 10_000:
            containers.append(v)
            stack.extend(v.values() if isinstance(v, dict) else v)
    if not containers:
        return copy.deepcopy(rng.choice(_VALUES))
    c = rng.choice(containers)
    op = rng.randrange(5)
    if isinstance(c, dict):
        keys = list(c)
        if op == 0 or not keys:
            c[rng.choice(_NAMES + keys)] = copy.deepcopy(rng.choice(_VALUES + [c]))
        elif op == 1:
            del c[rng.choice(keys)]
        elif op == 2:
            k = rng.choice(keys)
            c[rng.choice(_NAMES) if rng.random() < 0.5 else k + rng.choice([".weight", "0", "_", ".1"])] = c.pop(k)
        elif op == 3:
            k = rng.choice(keys)
            c[k] = [c[k]] if rng.random() < 0.5 else {"x": c[k]}
        else:
            k = rng.choice(keys)
            c[k] = copy.deepcopy(rng.choice(_VALUES))
    else:
        if op in (0, 1) or not c:
            c.insert(rng.randrange(len(c) + 1), copy.deepcopy(rng.choice(_VALUES)))
        elif op == 2:
            del c[rng.randrange(len(c))]
        else:
            c[rng.randrange(len(c))] = copy.deepcopy(rng.choice(_VALUES))
    return value


def mutate_json_text(raw: bytes, max_size: int, rng: random.Random, mutate) -> bytes:
    """Half the time a tree edit of the parsed JSON, else libFuzzer's byte mutation."""
    if rng.random() < 0.5:
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if obj is not None:
            for _ in range(rng.randint(1, 3)):
                obj = mutate_tree(obj, rng)
            return json.dumps(obj).replace("\\\\ud800", "\\ud800").encode()[:max_size]
    return mutate(raw, max_size)


def mutate_safetensors(data: bytes, max_size: int, seed: int, mutate) -> bytes:
    """``mutate(bytes, max_size) -> bytes`` is libFuzzer's mutator (atheris.Mutate)."""
    rng = random.Random(seed)
    parts = split(data)
    if parts is None or rng.random() < 0.1:
        return mutate(data, max_size)
    header, body = parts
    header = mutate_json_text(header, max(len(header) * 2, 256), rng, mutate)
    if rng.random() < 0.7:
        fixed = retile(header, body)
        if fixed is not None and len(fixed) <= max_size:
            return fixed
    return (struct.pack("<Q", len(header)) + header + body)[:max_size]


def mutate_folder(data: bytes, max_size: int, seed: int, mutate) -> bytes:
    """Mutate one of the folder's files: JSON ones as bytes, shards structure-aware."""
    rng = random.Random(seed)
    files = data.split(PART)
    if len(files) < 2 or rng.random() < 0.05:
        return mutate(data, max_size)
    i = rng.randrange(len(files))
    budget = max(max_size - (len(data) - len(files[i])), 64)
    if i >= 2:
        files[i] = mutate_safetensors(files[i], budget, seed, mutate)
    else:
        files[i] = mutate_json_text(files[i], min(budget, max(len(files[i]) * 2, 256)), rng, mutate)
    return PART.join(files)[:max_size]


MUTATORS = {"safetensors": mutate_safetensors, "lora": mutate_safetensors, "fp8": mutate_safetensors,
            "sampler-inputs": mutate_safetensors, "folder": mutate_folder, "svdquant": mutate_safetensors}


def guarded(mutator):
    """A mutator that falls back to libFuzzer's own when it trips over its input (a mutator bug is no finding)."""
    def run(data: bytes, max_size: int, seed: int, mutate) -> bytes:
        try:
            return mutator(data, max_size, seed, mutate)
        except (ValueError, RecursionError, OverflowError, struct.error, TypeError):
            return mutate(data, max_size)
    return run


# ------------------------------------------------------------------- GGUF

_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_INTERESTING = [0, 1, 2, 3, 4, 5, 31, 32, 33, 255, 256, 4096, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 48,
                2 ** 63, 2 ** 64 - 1]
_QWEN_NAMES = [b"img_in.weight", b"txt_in.weight", b"proj_out.weight", b"transformer_blocks.0.attn.norm_q.weight",
               b"txt_norm.weight", b"transformer_blocks.9999.attn.to_q.weight", b"__index_timestep_zero__"]


def _gguf_value_end(buf: bytes, pos: int, code: int, depth: int = 0) -> int:
    if code in _GGUF_SCALAR_SIZES:
        return pos + _GGUF_SCALAR_SIZES[code]
    if code == 8:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if code == 9 and depth == 0:
        item, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item in _GGUF_SCALAR_SIZES:
            return pos + count * _GGUF_SCALAR_SIZES[item]
        for _ in range(min(count, 1 << 16)):
            pos = _gguf_value_end(buf, pos, item, depth + 1)
        return pos
    raise ValueError(code)


def parse_gguf(data: bytes):
    """(version, [(key, type, raw value)], [[name, dims, type, offset]], data section) or None."""
    try:
        if data[:4] != b"GGUF":
            return None
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
        pos, kvs, tensors = 24, [], []
        for _ in range(min(n_kv, 4096)):
            (n,) = struct.unpack_from("<Q", data, pos)
            key = data[pos + 8:pos + 8 + n]
            (code,) = struct.unpack_from("<I", data, pos + 8 + n)
            start = pos + 12 + n
            pos = _gguf_value_end(data, start, code)
            kvs.append((key, code, data[start:pos]))
        for _ in range(min(n_tensors, 4096)):
            (n,) = struct.unpack_from("<Q", data, pos)
            name = data[pos + 8:pos + 8 + n]
            pos += 8 + n
            (nd,) = struct.unpack_from("<I", data, pos)
            dims = list(struct.unpack_from(f"<{min(nd, 8)}Q", data, pos + 4))
            pos += 4 + 8 * nd
            code, offset = struct.unpack_from("<IQ", data, pos)
            pos += 12
            tensors.append([name, dims, code, offset])
        if pos > len(data):
            return None
        return version, kvs, tensors, data[pos + (-pos % 32):]
    except (struct.error, ValueError, OverflowError):
        return None


def _gguf_nbytes(dims: list, code: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(code)]
    except (ValueError, KeyError):
        return 0
    n = 1
    for d in dims:
        n *= d
    return n // block * size


def build_gguf(version: int, kvs: list, tensors: list, data: bytes, *, retile: bool) -> bytes:
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)))
    for key, code, raw in kvs:
        out += struct.pack("<Q", len(key)) + key + struct.pack("<I", code) + raw
    at, sizes = 0, []
    for name, dims, code, offset in tensors:
        size = _gguf_nbytes(dims, code)
        if retile:
            offset, at = at, at + size + (-size % 32)
        sizes.append(size)
        out += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d & (2 ** 64 - 1)) for d in dims) + struct.pack("<IQ", code, offset)
    out += bytes(-len(out) % 32)
    if retile and at <= MAX_BODY:
        data = (data * (at // max(len(data), 1) + 1))[:at] if data else bytes(at)
    return bytes(out) + data


def mutate_gguf(data: bytes, max_size: int, seed: int, mutate) -> bytes:
    """Field-level edits of a parsed GGUF (counts, lengths, types, dims, names, offsets), re-serialized."""
    rng = random.Random(seed)
    parsed = parse_gguf(data)
    if parsed is None or rng.random() < 0.15:
        return mutate(data, max_size)
    version, kvs, tensors, body = parsed
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(9)
        if op == 0 and tensors:  # dims
            t = rng.choice(tensors)
            t[1] = [rng.choice(_INTERESTING + t[1]) for _ in range(rng.choice([len(t[1]), 1, 2, 3, 4, 5, 0]))]
        elif op == 1 and tensors:  # type
            rng.choice(tensors)[2] = rng.choice([0, 1, 8, 2, 12, 13, 14, 30, 4, 39, 40, 41, 2 ** 31])
        elif op == 2 and tensors:  # name
            t = rng.choice(tensors)
            t[0] = rng.choice([rng.choice(tensors)[0], rng.choice(_QWEN_NAMES), mutate(t[0], 64)])
        elif op == 3 and tensors:  # drop, duplicate or reorder tensors
            i = rng.randrange(len(tensors))
            kind = rng.randrange(3)
            if kind == 0:
                del tensors[i]
            elif kind == 1:
                tensors.insert(rng.randrange(len(tensors) + 1), list(tensors[i]))
            else:
                rng.shuffle(tensors)
        elif op == 4 and tensors:  # offset
            rng.choice(tensors)[3] = rng.choice(_INTERESTING)
        elif op == 5 and kvs:  # value type
            i = rng.randrange(len(kvs))
            kvs[i] = (kvs[i][0], rng.choice([0, 4, 6, 7, 8, 9, 10, 12, 13, 2 ** 31]), kvs[i][2])
        elif op == 6 and kvs:  # value bytes (string/array lengths included)
            i = rng.randrange(len(kvs))
            kvs[i] = (kvs[i][0], kvs[i][1], mutate(kvs[i][2], 256))
        elif op == 7:  # a new key: alignment, an array, a duplicate
            key, code, raw = rng.choice([
                (b"general.alignment", 4, struct.pack("<I", rng.choice([0, 1, 3, 16, 32, 64, 4096, 2 ** 31]))),
                (b"general.alignment", 8, struct.pack("<Q", 2) + b"32"),
                (b"k.array", 9, struct.pack("<IQ", rng.choice([0, 8, 9, 6]), rng.choice(_INTERESTING)) + b"\0" * 16),
                (kvs[0][0] if kvs else b"k", 0, b"\1"),
            ])
            kvs.insert(rng.randrange(len(kvs) + 1), (key, code, raw))
        else:  # a key's name
            if kvs:
                i = rng.randrange(len(kvs))
                kvs[i] = (mutate(kvs[i][0], 64), kvs[i][1], kvs[i][2])
    try:
        out = build_gguf(version, kvs, tensors, body, retile=rng.random() < 0.7)
    except (struct.error, OverflowError):
        return mutate(data, max_size)
    return out[:max_size]


MUTATORS["gguf"] = mutate_gguf
MUTATORS["verify-baseline"] = lambda data, max_size, seed, mutate: mutate_json_text(
    data, max_size, random.Random(seed), mutate)
MUTATORS["imatrix"] = lambda data, max_size, seed, mutate: (
    mutate_gguf if data[:4] == b"GGUF" else mutate_safetensors)(data, max_size, seed, mutate)
MUTATORS = {name: guarded(m) for name, m in MUTATORS.items()}
