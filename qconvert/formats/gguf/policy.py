"""Which GGML type each tensor gets at each level (spec ``gguf.md`` §5).

Three policies, all pure functions of the tensor's role and block (asked of the
model map), its shape, the level and the config:

``city96`` (default)
    city96's ``img_tensor_get_type`` from ComfyUI-GGUF's ``auto_convert`` tools:
    the attn-v bump (with llama-quantize's ``i_attention_wv`` counter), the
    ffn-down bump, then the first/last-block override.  It reproduces the byte
    sizes of city96/Qwen-Image-gguf.
``quantstack``
    The same with ComfyUI-GGUF PR #370's override (low levels put blocks 0 and
    last at Q5_K), as in QuantStack's Edit-2509 files after their 2025-10-18 update.
``uniform``
    Every block linear at the level's base type, like ``llama-quantize --pure``.

city96's tools predate the IQ4 levels; there ``city96`` and ``quantstack``
apply llama-quantize's own rule for them (:data:`IQ4_EARLY_FFN_DOWN`).

In every policy 1-D tensors are F32, the six embedding/final weights stay BF16
and only the 14 linears of each transformer block are ever quantized.
"""

from __future__ import annotations

import math
from typing import Mapping

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from qconvert.core.errors import QConvertError
from qconvert.core.models import qwen_image as qi

T = GGMLQuantizationType

# Largest first: the order of `--level all` and of the published file lists.
LEVELS = ("BF16", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0",
          "Q4_K_M", "Q4_K_S", "Q4_1", "IQ4_NL", "Q4_0", "IQ4_XS", "Q3_K_M", "Q3_K_S", "Q2_K")
ALL = "all"
POLICIES = ("city96", "quantstack", "uniform")
DEFAULT_POLICY = "city96"

# llama.cpp's `general.file_type` for each level (gguf-py's LlamaFileType).
FILE_TYPE: Mapping[str, int] = {level: int(LlamaFileType[f"MOSTLY_{level}"]) for level in LEVELS}

# llama-quantize's default tensor type per ftype (b3962).
BASE_TYPE: Mapping[str, T] = {
    "BF16": T.BF16, "F16": T.F16, "Q8_0": T.Q8_0, "Q6_K": T.Q6_K,
    "Q5_K_M": T.Q5_K, "Q5_K_S": T.Q5_K, "Q5_1": T.Q5_1, "Q5_0": T.Q5_0,
    "Q4_K_M": T.Q4_K, "Q4_K_S": T.Q4_K, "Q4_1": T.Q4_1, "Q4_0": T.Q4_0,
    "Q3_K_M": T.Q3_K, "Q3_K_S": T.Q3_K, "Q2_K": T.Q2_K,
    "IQ4_NL": T.IQ4_NL, "IQ4_XS": T.IQ4_XS,
}

# llama.cpp's one rule for the IQ4 file types that a Qwen-Image block meets (its attn-v bump needs
# grouped-query attention, which MMDiT has not): without an importance matrix, the ffn-down of the first
# eighth of the blocks goes up to Q5_K.
IQ4_LEVELS = ("IQ4_NL", "IQ4_XS")
IQ4_EARLY_FFN_DOWN = T.Q5_K

# city96 rule 5 ("ffn-down"): every MLP down projection, whatever its block.
FFN_DOWN_BUMP: Mapping[str, T] = {
    "Q3_K_M": T.Q4_K, "Q4_K_S": T.Q5_K, "Q4_K_M": T.Q6_K, "Q5_K_M": T.Q6_K,
    "Q4_0": T.Q4_1, "Q5_0": T.Q5_1,
}

# Rule 6: every quantized tensor of block 0 and of the last block.
EDGE_BLOCK_OVERRIDE: Mapping[str, Mapping[str, T]] = {
    "city96": {"Q2_K": T.Q4_K, "Q3_K_S": T.Q4_K, "Q3_K_M": T.Q4_K, "Q4_K_M": T.Q5_K, "Q5_K_M": T.Q6_K},
    "quantstack": {"Q2_K": T.Q5_K, "Q3_K_S": T.Q5_K, "Q3_K_M": T.Q5_K, "Q4_0": T.Q5_K, "Q4_1": T.Q5_K,
                   "Q4_K_S": T.Q5_K, "Q4_K_M": T.Q5_K, "Q5_K_M": T.Q6_K},
}

# city96's convert.py keeps tensors this small in F32 (QUANTIZATION_THRESHOLD).
F32_MAX_ELEMENTS = 1024


def check_level(level: str) -> str:
    """The canonical spelling of a level (case-insensitive), or a one-line error."""
    for known in (*LEVELS, ALL):
        if level.upper() == known.upper():
            return known
    raise QConvertError(f"unknown GGUF level {level!r}; choose one of {', '.join(LEVELS)} or {ALL}")


def expand_levels(level: str) -> list[str]:
    """``all``, one level, or a comma-separated list (each read once: ``Q8_0,Q4_K_M``)."""
    if "," in level:
        levels = [check_level(part.strip()) for part in level.split(",")]
        if ALL in levels or len(set(levels)) != len(levels):
            raise QConvertError(f"--level {level}: list distinct levels, without {ALL}")
        return levels
    level = check_level(level)
    return list(LEVELS) if level == ALL else [level]


def v_bump(level: str, v_index: int) -> T | None:
    """city96 rule 3 ("attn-v"); ``v_index`` is llama-quantize's ``i_attention_wv``
    before this tensor, i.e. how many v projections came earlier in file order."""
    if level == "Q2_K":
        return T.Q3_K
    if level == "Q3_K_M":
        return T.Q5_K if v_index < 2 else T.Q4_K
    if level in ("Q4_K_M", "Q5_K_M"):
        return T.Q6_K
    if level == "Q4_K_S" and v_index < 4:
        return T.Q5_K
    return None


def tensor_type(name: str, shape: tuple, level: str, config: qi.QwenImageConfig, *,
                policy: str = DEFAULT_POLICY, v_index: int = 0, has_imatrix: bool = False) -> T:
    """The GGML type of one tensor.  ``v_index`` matters only for v projections (see
    :func:`assign_types`, which counts them in file order); ``has_imatrix`` only for the IQ4 levels."""
    info = qi.describe(name) if qi.is_known(name) else None
    if len(shape) <= 1:
        # ComfyUI-GGUF breaks on 1-D BF16 before its Dec 2025 fix, and its
        # RMSNorm is not GGML-aware: biases and norm gains must be F32.
        return T.F32
    if info is None or not info.is_block_linear or len(shape) != 2 or level == "BF16":
        # llama-quantize with city96's patch never touches img_in, txt_in,
        # time_text_embed, norm_out or proj_out: they keep the base file's type.
        return T.F32 if math.prod(shape) <= F32_MAX_ELEMENTS else T.BF16
    qtype = BASE_TYPE[level]
    if policy != "uniform" and level in IQ4_LEVELS:
        if info.role in qi.MLP_DOWN and info.block < config.num_layers // 8 and not has_imatrix:
            qtype = IQ4_EARLY_FFN_DOWN
    elif policy != "uniform":
        if info.role in qi.V_PROJECTIONS:
            qtype = v_bump(level, v_index) or qtype
        elif info.role in qi.MLP_DOWN:
            qtype = FFN_DOWN_BUMP.get(level, qtype)
        if info.block in (0, config.last_block):
            qtype = EDGE_BLOCK_OVERRIDE[policy].get(level, qtype)
    return row_fallback(qtype, shape[-1])


def row_fallback(qtype: T, row: int) -> T:
    """city96's llama-quantize writes F16 when a K-quant does not divide the row
    (rule 7); convert.py does the same for any block type (its QuantError path).
    IQ4_XS first falls back to IQ4_NL (blocks of 32), as llama-quantize does."""
    if qtype == T.IQ4_XS and row % GGML_QUANT_SIZES[qtype][0]:
        qtype = T.IQ4_NL
    block, _ = GGML_QUANT_SIZES[qtype]
    return T.F16 if row % block else qtype


def assign_types(shapes: Mapping[str, tuple], level: str, config: qi.QwenImageConfig, *,
                 policy: str = DEFAULT_POLICY, has_imatrix: bool = False) -> dict[str, T]:
    """Every tensor's type, in sorted (file) order, counting v projections as
    llama-quantize does: blocks 0, 1, 10, 11, ... in string order."""
    if level not in LEVELS:
        raise QConvertError(f"unknown GGUF level {level!r}; choose one of {', '.join(LEVELS)}")
    if policy not in POLICIES:
        raise QConvertError(f"unknown GGUF policy {policy!r}; choose one of {', '.join(POLICIES)}")
    types: dict[str, T] = {}
    v_index = 0
    for name in sorted(shapes):
        types[name] = tensor_type(name, tuple(shapes[name]), level, config, policy=policy, v_index=v_index,
                                  has_imatrix=has_imatrix)
        if is_v_projection(name):
            v_index += 1
    return types


def is_v_projection(name: str) -> bool:
    return qi.is_known(name) and qi.describe(name).role in qi.V_PROJECTIONS


def tensor_nbytes(qtype: T, shape: tuple) -> int:
    """Exact data bytes of a tensor of this type and (torch-order) shape."""
    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size
