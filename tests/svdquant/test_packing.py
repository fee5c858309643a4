"""Every Nunchaku packer against its unpacker, and against the index formulas of spec svdquant.md §4."""

from __future__ import annotations

import pytest
import torch

from qconvert.codecs.svdquant import packing as P


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n, k", [(128, 128), (256, 384), (384, 1024)])
def test_codes_round_trip_and_match_the_tile_formula(n, k):
    codes = torch.randint(-8, 8, (n, k), generator=gen())
    packed = P.pack_codes(codes)
    assert packed.dtype == torch.int8 and packed.shape == (n, k // 2)
    assert torch.equal(P.unpack_codes(packed, signed=True).long(), codes)
    fp4 = torch.randint(0, 16, (n, k), generator=gen(1))
    assert torch.equal(P.unpack_codes(P.pack_codes(fp4), signed=False).long(), fp4)
    # §4.1: tiles of 128 x 64 (1024 words) t-major; word ((P·8 + l)·4 + L)·4 + s·2 + s'; nibble e in bits 4e..4e+3
    words = packed.view(torch.uint8).reshape(-1, 4)
    for nn, kk in [(0, 0), (5, 70), (n - 1, k - 1), (n // 2 + 9, 37), (19, k - 64)]:
        t, rest = divmod(nn, 128)
        p, rest = divmod(rest, 16)
        s, lane = divmod(rest, 8)
        tk, rest = divmod(kk, 64)
        s2, rest = divmod(rest, 32)
        big_l, e = divmod(rest, 8)
        word = (t * (k // 64) + tk) * 1024 + ((p * 8 + lane) * 4 + big_l) * 4 + s * 2 + s2
        byte = int(words[word, e // 2])
        assert (byte >> (4 * (e % 2))) & 0xF == int(codes[nn, kk]) & 0xF


def test_group_scales_round_trip_and_flat_index():
    n, g = 256, 6
    scales = torch.randn(n, g, generator=gen()).to(torch.bfloat16)
    packed = P.pack_scales(scales)
    assert packed.shape == (g, n) and torch.equal(P.unpack_scales(packed), scales)
    flat = packed.reshape(-1)
    for nn, gg in [(0, 0), (9, 3), (255, 5), (130, 1)]:  # §4.2: ((t·G + g)·8 + a)·16 + c·4 + b·2 + d
        t, rest = divmod(nn, 128)
        a, rest = divmod(rest, 16)
        b, rest = divmod(rest, 8)
        c, d = divmod(rest, 2)
        assert flat[((t * g + gg) * 8 + a) * 16 + c * 4 + b * 2 + d] == scales[nn, gg]


def test_vectors_use_the_lanes_order():
    v = torch.arange(256.0).to(torch.bfloat16)
    packed = P.pack_vector(v)
    assert packed[:16].tolist() == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
    assert torch.equal(P.unpack_vector(packed), v)


def test_micro_scales_round_trip_and_lanes():
    scales = (torch.rand(256, 24, generator=gen()) * 400).to(torch.float8_e4m3fn)
    packed = P.pack_micro_scales(scales)
    assert packed.dtype == torch.float8_e4m3fn and packed.shape == (24, 256)
    assert torch.equal(P.unpack_micro_scales(packed).view(torch.uint8), scales.view(torch.uint8))
    channel = torch.arange(128.0).reshape(128, 1).expand(128, 4).to(torch.float8_e4m3fn)
    first = P.pack_micro_scales(channel).reshape(-1).float()[:32].reshape(8, 4)[:, 0].tolist()
    assert first == [0, 32, 64, 96, 8, 40, 72, 104]  # lane 0, then lane 1 (§4.3)


@pytest.mark.parametrize("down, shape", [(True, (32, 256)), (False, (384, 32)), (True, (128, 3072 // 8))])
def test_lowrank_round_trip_and_fragment_order(down, shape):
    x = torch.randn(*shape, generator=gen()).to(torch.bfloat16)
    stored = P.pack_lowrank(x, down=down)
    assert stored.shape == (shape[1], shape[0]) if down else stored.shape == shape
    assert torch.equal(P.unpack_lowrank(stored, down=down), x)
    # §4.5: inside each 16x16 fragment, n = np·8 + nl and k = kp·8 + kl·2 + e stored in (nl, kl, np, kp, e) order
    logical = x.T if down else x  # fragments over (in or out) x rank: down's n is the rank, up's the output
    rows, cols = logical.shape
    flat = stored.reshape(-1)
    for i, j in [(0, 0), (17, 5), (rows - 1, cols - 1), (8, 9)]:
        n, k = (j, i) if down else (i, j)  # the fragment's n and k coordinates
        fn, fk = (i // 16, j // 16)
        frag = (fn * (cols // 16) + fk) * 256
        n_in, k_in = n % 16, k % 16
        np_, nl = divmod(n_in, 8)
        kp, rest = divmod(k_in, 8)
        kl, e = divmod(rest, 2)
        assert flat[frag + (((nl * 4 + kl) * 2 + np_) * 2 + kp) * 2 + e] == logical[i, j]


def test_awq_round_trip_and_word_layout():
    codes = torch.randint(0, 16, (128, 192), generator=gen())
    packed = P.pack_awq(codes)
    assert packed.dtype == torch.int32 and packed.shape == (32, 96)
    assert torch.equal(P.unpack_awq(packed).long(), codes)
    # §4.6: within a 32-chunk, 16-bit word i holds elements i, i+8, i+16, i+24; four rows interleave per 64 k
    words = packed.view(torch.int16).reshape(32, 192).to(torch.int32) & 0xFFFF
    for row, k in [(0, 0), (5, 77), (127, 191), (66, 130)]:
        chunk, within = divmod(k, 32)
        j, i = divmod(within, 8)
        word_in_row = chunk * 8 + i  # 16-bit word index along the row before the row interleave
        block, w16 = divmod(word_in_row, 16)
        value = int(words[row // 4, block * 64 + (row % 4) * 16 + w16])
        assert (value >> (4 * j)) & 0xF == int(codes[row, k])


def test_modulation_interleave():
    x = torch.arange(12.0)
    stored = P.interleave_modulation(x)
    assert stored.tolist() == [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]  # o = d·6 + j for D = 2
    assert torch.equal(P.deinterleave_modulation(stored), x)
    rows = torch.randn(12, 5, generator=gen())
    assert torch.equal(P.deinterleave_modulation(P.interleave_modulation(rows).T).T, rows)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiples of 128"):
        P.pack_codes(torch.zeros(100, 128, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiples of 16"):
        P.pack_lowrank(torch.zeros(20, 128, dtype=torch.bfloat16), down=True)
