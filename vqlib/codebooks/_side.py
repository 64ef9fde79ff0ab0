"""Side data as code columns: per-vector floats (norms, scales) bit-cast and cut into columns of
the codes' own bit width, so `pack_codes(codes, bits)` stores them with the codes and
`code_layout(cb).bits_per_vector` counts them (TurboQuant, QJL, RaBitQ)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

FLOAT_DTYPES = ("float16", "float32")


def float_bits(dtype: str) -> int:
    """Bits one stored float of `dtype` takes: 16 or 32."""
    return 16 if dtype == "float16" else 32


def side_columns(num_floats: int, dtype: str, bits: int) -> int:
    """Columns of `bits` bits that hold `num_floats` floats of `dtype`."""
    return -(-num_floats * float_bits(dtype) // bits)


def _unsigned(dtype: str):
    return jnp.uint16 if dtype == "float16" else jnp.uint32


def _positions(shape: tuple[int, ...], bits: int):
    """(*shape, bits) uint32 bit positions 0..bits-1 along the last axis."""
    return lax.broadcasted_iota(jnp.uint32, (*shape, bits), len(shape))


def floats_to_columns(values, dtype: str, bits: int):
    """(n, f) float32 -> (n, side_columns(f, dtype, bits)) int32 columns of `bits` bits holding the floats."""
    width = float_bits(dtype)
    words = lax.bitcast_convert_type(values.astype(dtype), _unsigned(dtype)).astype(jnp.uint32)
    stream = ((words[..., None] >> _positions(words.shape, width)) & 1).reshape(values.shape[0], -1)
    num_columns = -(-stream.shape[1] // bits)
    stream = jnp.pad(stream, ((0, 0), (0, num_columns * bits - stream.shape[1])))
    stream = stream.reshape(values.shape[0], num_columns, bits)
    return jnp.sum(stream << _positions(stream.shape[:-1], bits), axis=-1).astype(jnp.int32)


def columns_to_floats(columns, num_floats: int, dtype: str, bits: int):
    """Inverse of `floats_to_columns`: (n, c) int32 -> (n, num_floats) float32."""
    width = float_bits(dtype)
    stream = (columns.astype(jnp.uint32)[..., None] >> _positions(columns.shape, bits)) & 1
    stream = stream.reshape(columns.shape[0], -1)[:, : num_floats * width].reshape(-1, num_floats, width)
    words = jnp.sum(stream << _positions(stream.shape[:-1], width), axis=-1)
    return lax.bitcast_convert_type(words.astype(_unsigned(dtype)), dtype).astype(jnp.float32)
