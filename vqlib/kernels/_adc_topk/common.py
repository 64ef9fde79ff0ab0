"""Shared by the ADC top-k backends: the final merge of per-tile candidates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def merge_candidates(dists: jax.Array, ids: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(q, c) candidate (distance, row) pairs -> the k smallest per query, ties to the lowest row."""
    dists, ids = lax.sort((dists, ids), dimension=1, num_keys=2)
    return dists[:, :k], ids[:, :k].astype(jnp.int32)


def check_dtypes(tables: jax.Array, codes: jax.Array, backend: str):
    if tables.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"{backend} adc_topk takes float32/bfloat16/float16 tables, got {tables.dtype}")
    if codes.dtype not in (jnp.uint8, jnp.int8, jnp.uint16, jnp.int16, jnp.int32, jnp.uint32):
        raise NotImplementedError(f"{backend} adc_topk takes 8-, 16- or 32-bit integer codes, got {codes.dtype}")


def select_topk(s: jax.Array, rows: jax.Array, num_slots: int, k: int) -> tuple[jax.Array, jax.Array]:
    """Inside a kernel: the k smallest of the (bq, bn) scores `s` (global row ids `rows`), by k rounds
    of (min, lowest row attaining it, mask it out); slots k..num_slots-1 stay (inf, 0)."""
    bq = s.shape[0]
    slots = lax.broadcasted_iota(jnp.int32, (bq, num_slots), 1)
    last = jnp.iinfo(jnp.int32).max

    def pick(t, carry):
        s, out_d, out_i = carry
        best = jnp.min(s, axis=1, keepdims=True)  # (bq, 1)
        arg = jnp.min(jnp.where(s == best, rows, last), axis=1, keepdims=True)
        out_d = jnp.where(slots == t, best, out_d)
        out_i = jnp.where(slots == t, arg, out_i)
        return jnp.where(rows == arg, jnp.inf, s), out_d, out_i

    init = (s, jnp.full((bq, num_slots), jnp.inf, jnp.float32), jnp.zeros((bq, num_slots), jnp.int32))
    _, out_d, out_i = lax.fori_loop(0, k, pick, init)
    return out_d, out_i


def lookup_dot(table: jax.Array, column: jax.Array, precision) -> jax.Array:
    """Inside a kernel: (bq, kc) table, (bn, 1) codes -> (bq, bn) table[:, codes] as a one-hot matmul
    on the matrix units (exact: each product picks one entry)."""
    entries = lax.broadcasted_iota(jnp.int32, (column.shape[0], table.shape[1]), 1)
    onehot = (column == entries).astype(table.dtype)  # (bn, kc)
    return lax.dot_general(
        table, onehot, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )
