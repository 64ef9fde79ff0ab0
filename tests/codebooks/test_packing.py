"""Packed storage: a float-free bit-level reference in numpy, and round trips at every width."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vqlib
from vqlib.codebooks import pack_codes, unpack_codes


def _pack_reference(codes, bits):
    """Bit j of code i goes to bit (i * bits + j) of the row, bytes little-endian: one bit at a time."""
    n, m = codes.shape
    out = np.zeros((n, -(-m * bits // 8)), np.uint8)
    for r in range(n):
        for i in range(m):
            for j in range(bits):
                if (int(codes[r, i]) >> j) & 1:
                    pos = i * bits + j
                    out[r, pos // 8] |= np.uint8(1 << (pos % 8))
    return out


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 16), m=st.integers(1, 19), n=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_pack_matches_bitwise_reference_and_round_trips(bits, m, n, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(n, m))
    packed = pack_codes(codes, bits)
    np.testing.assert_array_equal(packed, _pack_reference(codes, bits))
    np.testing.assert_array_equal(unpack_codes(packed, bits, m), codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 6, 12])
@pytest.mark.parametrize("m", [1, 7, 8, 13, 64])
def test_word_unpacking_matches_the_bitwise_reference(bits, m):
    """Widths read as whole words (1, 2, 3, 6, 12 bits) and through the bit stream (5), every m."""
    codes = np.random.default_rng(bits * 100 + m).integers(0, 2**bits, size=(3, 2, m))
    packed = _pack_reference(codes.reshape(6, m), bits).reshape(3, 2, -1)
    np.testing.assert_array_equal(unpack_codes(packed, bits, m), codes)


def test_byte_and_nibble_layouts():
    codes = np.array([[1, 2, 300, 65535]])
    assert pack_codes(codes, 16).tolist() == [[1, 0, 2, 0, 44, 1, 255, 255]]  # little-endian uint16
    assert pack_codes(np.array([[0xA, 0x5, 0xF]]), 4).tolist() == [[0x5A, 0x0F]]  # code 0 in the low nibble
    assert pack_codes(np.array([[7, 200]]), 8).tolist() == [[7, 200]]


def test_codebook_layouts_give_the_packing_width(key):
    import jax

    x = jax.random.normal(key, (600, 8))
    for cb, (m, bits) in [
        (vqlib.fit(x, "kmeans", k=10), (1, 4)),
        (vqlib.fit(x, "pq", m=4, k=256, max_iter=2), (4, 8)),
        (vqlib.fit(x, "rvq", m=3, k=5, max_iter=2), (3, 3)),
    ]:
        layout = vqlib.code_layout(cb)
        assert (layout.num_codebooks, layout.bits, layout.bits_per_vector) == (m, bits, m * bits)
        codes = vqlib.encode(cb, x).reshape(600, -1)
        packed = pack_codes(codes, layout.bits)
        assert packed.shape == (600, -(-m * bits // 8))
        np.testing.assert_array_equal(unpack_codes(packed, layout.bits, m), codes)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"must lie in \[0, 16\)"):
        pack_codes(np.array([[3, 16]]), 4)  # would be truncated
    with pytest.raises(ValueError, match="bits must be <= 16"):
        pack_codes(np.array([[1]]), 17)
    with pytest.raises(ValueError, match="bits must be >= 1"):
        pack_codes(np.array([[0]]), 0)
    with pytest.raises(TypeError, match="integer"):
        pack_codes(np.array([[1.0]]), 4)
    with pytest.raises(ValueError, match="need 2"):
        unpack_codes(np.zeros((3, 3), np.uint8), 4, 3)
    with pytest.raises(TypeError, match="uint8"):
        unpack_codes(np.zeros((3, 2), np.int32), 4, 3)
