"""The jnp statement of `kivi_attend`: dequantise the whole range, then a masked softmax."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

NEG = float(jnp.finfo(jnp.float32).min)


def unpack(codes, bits: int, hd: int):
    """(..., hd * bits / 8) uint8 -> (..., hd) float32: little-endian bit fields (bits divides 8)."""
    shifts = bits * jnp.arange(8 // bits, dtype=jnp.int32).reshape((1,) * codes.ndim + (-1,))
    fields = (codes.astype(jnp.int32)[..., None] >> shifts) & (2**bits - 1)
    return fields.reshape(*codes.shape[:-1], hd).astype(jnp.float32)


def kivi_dequant(key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, *, bits: int, group: int):
    """Every stored position's key and value, (b, n, kvh, hd) float32 each."""
    hd = key_scale.shape[-1]
    rows = jnp.arange(key_codes.shape[1]) // group
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    k = unpack(key_codes, bits, hd) * f32(key_scale)[:, rows] + f32(key_zero)[:, rows]
    b, n, kvh, _ = value_codes.shape
    v = unpack(value_codes, bits, hd).reshape(b, n, kvh, hd // group, group)
    v = v * f32(value_scale)[..., None] + f32(value_zero)[..., None]
    return k, v.reshape(b, n, kvh, hd)


def kivi_attend_reference(
    q, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, lo, hi, *, bits: int, group: int
):
    k, v = kivi_dequant(key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, bits=bits, group=group)
    hp = lax.Precision.HIGHEST
    s = jnp.einsum("bkrd,bnkd->bkrn", q.astype(jnp.float32), k, precision=hp)
    pos = jnp.arange(k.shape[1])
    inside = (pos >= lo) & (pos < hi)
    inside = inside[None, None, None]
    s = jnp.where(inside, s, NEG)
    m = jnp.max(s, axis=-1)
    p = jnp.where(inside, jnp.exp(s - m[..., None]), 0.0)
    return m, jnp.sum(p, axis=-1), jnp.einsum("bkrn,bnkd->bkrd", p, v, precision=hp)
