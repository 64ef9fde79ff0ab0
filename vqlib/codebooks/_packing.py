"""Packed storage: int32 codes of a stated bit-width <-> a dense little-endian byte stream.

Codes are int32 in compute; storage (files, indexes, compressed weights) packs each row of m
codes of `bits` bits into ceil(m * bits / 8) bytes, code j occupying bits [j * bits, (j + 1) * bits)
of the row, least significant bit first. bits = 8 is one byte per code; bits = 16 two bytes,
little-endian; bits = 4 two codes per byte, code 0 in the low nibble (faiss's order).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Int, Int32, UInt8

from vqlib import _checks

MAX_BITS = 16


def _check_bits(bits) -> int:
    return _checks.check_int(bits, "bits", low=1, high=MAX_BITS)


def packed_width(m: int, bits: int) -> int:
    """Bytes per row of m codes of `bits` bits."""
    return -(-m * bits // 8)


def pack_codes(codes: Int[ArrayLike, "*b m"], bits: int) -> UInt8[Array, "*b w"]:
    """Packs (..., m) integer codes, each in [0, 2**bits), into (..., ceil(m * bits / 8)) uint8.

    Concrete codes that do not fit raise ValueError (never truncated); under jit the values
    cannot be checked and only the low `bits` bits of each code are kept.

    Example:
        >>> import numpy as np, vqlib
        >>> packed = vqlib.codebooks.pack_codes(np.array([[1, 2, 3]]), bits=4)
        >>> packed.tolist(), vqlib.codebooks.unpack_codes(packed, bits=4, m=3).tolist()
        ([[33, 3]], [[1, 2, 3]])
    """
    bits = _check_bits(bits)
    if not hasattr(codes, "dtype"):
        codes = np.asarray(codes)
    if codes.ndim < 1:
        raise ValueError("codes must have shape (..., m), got a scalar; use codes[None] for one code")
    codes = _checks.check_codes(codes, 2**bits, name=f"codes (packed at bits={bits})")
    return _pack(codes, bits)


def _positions(count: int, ndim: int):
    """0 .. count-1 along the last of `ndim` axes (bit positions, broadcast without rank promotion)."""
    return jnp.arange(count, dtype=jnp.int32).reshape((1,) * (ndim - 1) + (count,))


@functools.partial(jax.jit, static_argnames="bits")
def _pack(codes, bits: int):
    m = codes.shape[-1]
    stream = (codes[..., None] >> _positions(bits, codes.ndim + 1)) & 1  # (..., m, bits)
    stream = stream.reshape(*codes.shape[:-1], m * bits)
    pad = packed_width(m, bits) * 8 - m * bits
    stream = jnp.pad(stream, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    stream = stream.reshape(*codes.shape[:-1], -1, 8)
    return jnp.sum(stream << _positions(8, stream.ndim), axis=-1).astype(jnp.uint8)


def unpack_codes(packed: UInt8[ArrayLike, "*b w"], bits: int, m: int) -> Int32[Array, "*b {m}"]:
    """Inverse of `pack_codes`: (..., ceil(m * bits / 8)) uint8 -> (..., m) int32."""
    bits = _check_bits(bits)
    m = _checks.check_int(m, "m", low=1)
    if not hasattr(packed, "dtype"):
        packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise TypeError(f"packed must be uint8 (the output of pack_codes), got dtype {packed.dtype}")
    if packed.ndim < 1 or packed.shape[-1] != packed_width(m, bits):
        raise ValueError(
            f"packed has {packed.shape[-1] if packed.ndim else 0} bytes per row but m={m} codes of {bits} bits "
            f"need {packed_width(m, bits)}; pass the m and bits the codes were packed with"
        )
    return _unpack(jnp.asarray(packed), bits, m)


@functools.partial(jax.jit, static_argnames=("bits", "m"))
def _unpack(packed, bits: int, m: int):
    if bits == 8:
        return packed.astype(jnp.int32)
    word_bytes = math.lcm(8, bits) // 8
    if word_bytes <= 3:  # whole codes in words of 1-3 bytes (1, 2, 3, 4, 6, 12 bits): shifts, no bit stream
        return _unpack_words(packed, bits, m, word_bytes)
    stream = (packed[..., None].astype(jnp.int32) >> _positions(8, packed.ndim + 1)) & 1  # (..., bytes, 8)
    stream = stream.reshape(*packed.shape[:-1], -1)[..., : m * bits]
    stream = stream.reshape(*packed.shape[:-1], m, bits)
    return jnp.sum(stream << _positions(bits, stream.ndim), axis=-1)


def _unpack_words(packed, bits: int, m: int, word_bytes: int):
    """Codes read from little-endian words of `word_bytes` bytes, each holding 8 word_bytes / bits
    whole codes (9x faster than the bit stream for 3-bit codes of a KV tile on XLA:CPU)."""
    lead = packed.shape[:-1]
    pad = -packed.shape[-1] % word_bytes
    p = jnp.pad(packed, [(0, 0)] * len(lead) + [(0, pad)]).astype(jnp.int32).reshape(*lead, -1, word_bytes)
    word = p[..., 0]
    for i in range(1, word_bytes):
        word = word | (p[..., i] << (8 * i))
    shifts = bits * jnp.arange(8 * word_bytes // bits, dtype=jnp.int32).reshape((1,) * word.ndim + (-1,))
    codes = (word[..., None] >> shifts) & (2**bits - 1)
    return codes.reshape(*lead, -1)[..., :m]
