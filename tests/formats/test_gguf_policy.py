"""The GGUF type policy and exact sizes against the published files (spec gguf.md §5, §8)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
from gguf import GGMLQuantizationType as T

from qconvert.core.checkpoint import open_checkpoint
from qconvert.core.errors import QConvertError
from qconvert.core.models import qwen_image as qi
from qconvert.formats.gguf import policy
from qconvert.formats.gguf.writer import plan_gguf

FULL = qi.QwenImageConfig()  # the published Qwen-Image transformer config
FULL_SHAPES = qi.expected_shapes(FULL)

# §8.2 with --minimal-metadata: (auto_convert = city96, PR #370 = quantstack).
EXPECTED_BYTES = {
    "BF16": (40_872_114_720, 40_872_114_720),
    "F16": (40_872_114_720, 40_872_114_720),
    "Q8_0": (21_761_817_120, 21_761_817_120),
    "Q6_K": (16_824_990_240, 16_824_990_240),
    "Q5_K_M": (14_934_899_232, 14_934_899_232),
    "Q5_K_S": (14_117_698_080, 14_117_698_080),
    "Q5_1": (15_391_717_920, 15_391_717_920),
    "Q5_0": (14_400_813_600, 14_400_813_600),
    "Q4_K_M": (13_065_746_976, 13_065_746_976),
    "Q4_K_S": (12_140_608_032, 12_204_309_024),
    "Q4_1": (12_843_678_240, 12_886_145_568),
    "Q4_0": (11_852_773_920, 11_928_271_392),
    "Q3_K_M": (9_679_567_392, 9_764_502_048),
    "Q3_K_S": (8_952_609_312, 9_037_543_968),
    "Q2_K": (7_062_518_304, 7_147_452_960),
}

# §5.3: types of the 840 block linears under the auto_convert (city96) rules.
EXPECTED_COUNTS = {
    "BF16": {"BF16": 840}, "F16": {"F16": 840}, "Q8_0": {"Q8_0": 840}, "Q6_K": {"Q6_K": 840},
    "Q5_K_M": {"Q5_K": 580, "Q6_K": 260}, "Q5_K_S": {"Q5_K": 840}, "Q5_1": {"Q5_1": 840},
    "Q5_0": {"Q5_0": 720, "Q5_1": 120},
    "Q4_K_M": {"Q4_K": 580, "Q6_K": 232, "Q5_K": 28}, "Q4_K_S": {"Q4_K": 716, "Q5_K": 124},
    "Q4_1": {"Q4_1": 840}, "Q4_0": {"Q4_0": 720, "Q4_1": 120},
    "Q3_K_M": {"Q3_K": 580, "Q4_K": 260}, "Q3_K_S": {"Q3_K": 812, "Q4_K": 28},
    "Q2_K": {"Q2_K": 696, "Q3_K": 116, "Q4_K": 28},
    # llama.cpp's IQ4 rule: without an imatrix the ffn-down of blocks 0-6 (the first eighth) at Q5_K
    "IQ4_NL": {"IQ4_NL": 826, "Q5_K": 14}, "IQ4_XS": {"IQ4_XS": 826, "Q5_K": 14},
}

# §3.2: llama.cpp's LlamaFileType per level.
EXPECTED_FILE_TYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
                       "Q3_K_M": 12, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25,
                       "IQ4_XS": 30, "BF16": 32}


def block_linear_counts(types: dict) -> dict:
    return dict(Counter(t.name for n, t in types.items() if qi.describe(n).is_block_linear))


def test_levels_and_file_types():
    assert set(policy.LEVELS) == set(EXPECTED_FILE_TYPES)
    assert dict(policy.FILE_TYPE) == EXPECTED_FILE_TYPES
    assert policy.expand_levels("all") == list(policy.LEVELS)
    assert policy.expand_levels("q4_k_m") == ["Q4_K_M"]
    with pytest.raises(QConvertError, match="unknown GGUF level 'Q7_K'.*Q4_K_M"):
        policy.expand_levels("Q7_K")
    with pytest.raises(QConvertError, match="unknown GGUF policy"):
        policy.assign_types(FULL_SHAPES, "Q4_K_M", FULL, policy="bartowski")


@pytest.mark.parametrize("level", policy.LEVELS)
def test_city96_type_counts(level):
    types = policy.assign_types(FULL_SHAPES, level, FULL)
    assert block_linear_counts(types) == EXPECTED_COUNTS[level]


@pytest.mark.parametrize("level", policy.LEVELS)
@pytest.mark.parametrize("name", ["city96", "quantstack", "uniform"])
def test_fixed_types_at_every_level(level, name):
    types = policy.assign_types(FULL_SHAPES, level, FULL, policy=name)
    for tensor, shape in FULL_SHAPES.items():
        role = qi.describe(tensor).role
        if len(shape) == 1:
            assert types[tensor] == T.F32, tensor  # biases, RMSNorm gains, txt_norm
        elif role in (qi.Role.EMBED, qi.Role.FINAL):
            assert types[tensor] == T.BF16, tensor  # img_in, txt_in, time_text_embed, norm_out, proj_out


def test_attention_v_counter_follows_sorted_file_order():
    types = policy.assign_types(FULL_SHAPES, "Q4_K_S", FULL)
    # i_attention_wv < 4: the v projections of blocks 0 and 1, the first two in string order.
    for block, want in [(0, T.Q5_K), (1, T.Q5_K), (10, T.Q4_K), (2, T.Q4_K), (59, T.Q4_K)]:
        for module in ("to_v", "add_v_proj"):
            assert types[f"transformer_blocks.{block}.attn.{module}.weight"] == want, (block, module)
    assert policy.v_bump("Q3_K_M", 1) == T.Q5_K and policy.v_bump("Q3_K_M", 2) == T.Q4_K
    assert policy.v_bump("Q4_K_S", 3) == T.Q5_K and policy.v_bump("Q4_K_S", 4) is None


def test_override_side_effects_and_quantstack():
    city = policy.assign_types(FULL_SHAPES, "Q4_K_M", FULL)
    qs = policy.assign_types(FULL_SHAPES, "Q4_K_S", FULL, policy="quantstack")
    v0, v59 = "transformer_blocks.0.attn.to_v.weight", "transformer_blocks.59.attn.to_v.weight"
    down = "transformer_blocks.59.img_mlp.net.2.weight"
    assert city[v0] == city[v59] == city[down] == T.Q5_K  # dropped from Q6_K by the override
    assert city["transformer_blocks.30.attn.to_v.weight"] == T.Q6_K
    assert qs["transformer_blocks.59.img_mod.1.weight"] == T.Q5_K
    assert qs["transformer_blocks.58.img_mod.1.weight"] == T.Q4_K


def test_uniform_is_the_base_type_everywhere():
    for level in policy.LEVELS:
        types = policy.assign_types(FULL_SHAPES, level, FULL, policy="uniform")
        assert block_linear_counts(types) == {policy.BASE_TYPE[level].name: 840}


def test_last_block_comes_from_the_config():
    config = replace(FULL, num_layers=12)
    types = policy.assign_types(qi.expected_shapes(config), "Q3_K_S", config)
    assert types["transformer_blocks.11.txt_mod.1.weight"] == T.Q4_K
    assert types["transformer_blocks.10.txt_mod.1.weight"] == T.Q3_K


def test_rows_not_divisible_by_the_block_fall_back_to_f16():
    config = replace(FULL, num_layers=3, num_attention_heads=1, attention_head_dim=128, joint_attention_dim=256)
    shapes = qi.expected_shapes(config)  # inner dim 128: rows of 128, except the MLP down ones (512)
    k = policy.assign_types(shapes, "Q4_K_M", config)
    for name, qtype in k.items():
        if qi.describe(name).is_block_linear:
            assert (qtype == T.F16) == (shapes[name][1] == 128), name
    legacy = policy.assign_types(shapes, "Q4_0", config)
    assert {t for n, t in legacy.items() if qi.describe(n).is_block_linear} <= {T.Q4_0, T.Q4_1}
    assert policy.row_fallback(T.Q8_0, 48) == T.F16 and policy.row_fallback(T.Q8_0, 64) == T.Q8_0


def test_small_and_unknown_tensors_are_never_quantized():
    assert policy.tensor_type("proj_out.weight", (64, 16), "Q4_0", FULL) == T.F32  # <= 1024 elements
    assert policy.tensor_type("lora_extra.weight", (3072, 3072), "Q4_0", FULL) == T.BF16
    assert policy.tensor_type(qi.MARKER_EDIT_2511, (0,), "Q4_0", FULL) == T.F32
    assert policy.tensor_type(qi.ADDITION_T_EMBEDDING, (2, 3072), "Q2_K", FULL) == T.BF16


def test_iq4_levels_with_an_imatrix_keep_every_linear_at_the_base_type():
    for level in policy.IQ4_LEVELS:
        types = policy.assign_types(FULL_SHAPES, level, FULL, has_imatrix=True)
        assert block_linear_counts(types) == {level: 840}
    assert policy.row_fallback(T.IQ4_XS, 3072 + 32) == T.IQ4_NL  # llama-quantize's fallback, then F16
    assert policy.row_fallback(T.IQ4_XS, 3072 + 16) == T.F16


def test_iq4_full_size_bytes(full_size_sparse):
    """No published file to compare with: IQ4_NL stores 18 bytes per 32 as Q4_0 does, so its uniform file
    is Q4_0's size; IQ4_XS 136 per 256; the 14 early ffn-down layers at Q5_K (176 per 256) add the rest."""
    source = open_checkpoint(full_size_sparse)
    q4_0 = plan_gguf(source, "Q4_0", policy="uniform").bytes
    down = 3072 * 12288
    assert plan_gguf(source, "IQ4_NL", policy="uniform").bytes == q4_0
    assert plan_gguf(source, "IQ4_NL", policy="city96").bytes == q4_0 + 14 * down * (176 * 32 - 18 * 256) // 8192
    linears = sum(math.prod(s) for n, s in FULL_SHAPES.items() if qi.describe(n).is_block_linear)
    xs = plan_gguf(source, "IQ4_XS", policy="uniform").bytes
    assert xs == q4_0 - linears * (18 * 8 - 136) // 256
    assert plan_gguf(source, "IQ4_XS", policy="city96").bytes == xs + 14 * down * (176 - 136) // 256


@pytest.mark.parametrize("level", sorted(EXPECTED_BYTES))
def test_full_size_bytes_match_the_published_files(full_size_sparse, level, monkeypatch):
    source = open_checkpoint(full_size_sparse)
    monkeypatch.setattr(type(source), "load", lambda *a: pytest.fail("planning must not read tensor data"))
    city96, quantstack = EXPECTED_BYTES[level]
    assert plan_gguf(source, level, policy="city96").bytes == city96
    assert plan_gguf(source, level, policy="quantstack").bytes == quantstack
