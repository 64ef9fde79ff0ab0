"""Exact re-ranking: the candidates' raw vectors re-scored against the queries (faiss's IndexRefineFlat)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("l2", "k"))
def rerank_exact(vectors, queries, rows, *, l2: bool, k: int):
    """Exact scores of the candidate rows (q, R) (-1: none), best k: (dists (q, k), rows (q, k)),
    squared distances, or minus inner products."""
    x = vectors[jnp.maximum(rows, 0)]  # (q, R, d)
    if l2:
        scores = jnp.sum(jnp.square(x - queries[:, None, :]), axis=-1)
    else:
        scores = -jnp.einsum("qrd,qd->qr", x, queries, precision=_HIGHEST)
    scores = jnp.where(rows >= 0, scores, jnp.inf)
    neg, pick = lax.top_k(-scores, k)
    return -neg, jnp.where(jnp.isfinite(neg), jnp.take_along_axis(rows, pick, axis=1), -1)
