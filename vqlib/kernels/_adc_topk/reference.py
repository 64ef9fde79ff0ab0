"""The semantics of `adc_topk`, written plainly: scores every code row, then a full top-k."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Int, Int32


def adc_scores(
    tables: Float[ArrayLike, "q m kc"], codes: Int[ArrayLike, "n m"], bias: Float[ArrayLike, " n"] | None
) -> Float[Array, "q n"]:
    """(q, n) float32: out[i, r] = sum_j tables[i, j, codes[r, j]] + bias[r] (as `adc_lookup`)."""
    tables = tables.astype(jnp.float32)
    codes = codes.astype(jnp.int32)
    out = jnp.zeros((tables.shape[0], codes.shape[0]), jnp.float32)
    for j in range(codes.shape[1]):
        out = out + jnp.take(tables[:, j], codes[:, j], axis=1)
    return out if bias is None else out + bias.astype(jnp.float32)[None, :]


@functools.partial(jax.jit, static_argnames="k")
def adc_topk_reference(
    tables: Float[ArrayLike, "q m kc"], codes: Int[ArrayLike, "n m"], k: int, bias: Float[ArrayLike, " n"] | None = None
) -> tuple[Float[Array, "q {k}"], Int32[Array, "q {k}"]]:
    """The k smallest ADC scores per query; ties go to the lowest row index.

    Args:
        tables: (q, m, kc) per-query lookup tables (smaller is closer).
        codes: (n, m) integer codes of the database, values in [0, kc).
        k: results per query, 1 <= k <= n.
        bias: optional (n,) per-row term added to every score.

    Returns:
        dists (q, k) float32 ascending and ids (q, k) int32 rows of `codes`.
    """
    neg, ids = lax.top_k(-adc_scores(tables, codes, bias), k)  # top_k puts the lower index first on ties
    return -neg, ids.astype(jnp.int32)
