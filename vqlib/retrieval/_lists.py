"""The inverted-list layout: rows grouped by list, each list starting on a multiple of BLOCK rows.

List l holds rows offsets[l]:offsets[l + 1] (CSR), its vectors first, then padding rows up to the
next block, so a search reads whole blocks. The same layout serves an index and each shard of a
sharded index.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64  # lists start on multiples of BLOCK rows


def block_layout(lists: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows grouped by list, each list starting on a multiple of BLOCK rows.

    Returns (source (n_padded,) int64: the input row each stored row comes from, -1 for
    padding; offsets (nlist + 1,) int32). Stable: rows keep their order within a list.
    """
    counts = np.bincount(lists, minlength=nlist)
    padded = -(-counts // BLOCK) * BLOCK
    offsets = np.concatenate([[0], np.cumsum(padded)]).astype(np.int32)
    source = np.full(int(offsets[-1]), -1, np.int64)
    order = np.argsort(lists, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    within = np.arange(lists.size) - np.repeat(starts, counts)
    source[np.repeat(offsets[:-1], counts) + within] = order
    return source, offsets


def take_rows(column, source: np.ndarray, fill=0):
    """column[source], with `fill` where source is -1 (numpy or JAX column; None stays None)."""
    if column is None:
        return None
    if isinstance(column, np.ndarray):
        return np.where((source >= 0).reshape(-1, *[1] * (column.ndim - 1)), column[np.maximum(source, 0)], fill)
    return _take(column, jnp.asarray(source, jnp.int32), fill)


@functools.partial(jax.jit, static_argnames="fill")
def _take(column, source, fill):
    """column[source] with `fill` where source is -1, as one program."""
    keep = (source >= 0).reshape(-1, *[1] * (column.ndim - 1))
    return jnp.where(keep, column[jnp.maximum(source, 0)], jnp.asarray(fill, column.dtype))


def row_lists(offsets, n: int):
    """(n,) int32 list of each row, from the CSR offsets."""
    return (jnp.searchsorted(offsets, jnp.arange(n, dtype=jnp.int32), side="right") - 1).astype(jnp.int32)
