"""Asymmetric distance computation: scoring code rows against queries by table lookups."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from vqlib import _checks
from vqlib.kernels import adc_scores


def adc_lookup(
    tables: Float[ArrayLike, "q m k"], codes: Int[ArrayLike, "n m"], bias: Float[ArrayLike, " n"] | None = None
) -> Float[Array, "q n"]:
    """Scores every code row against every query: out[i, r] = sum_j tables[i, j, codes[r, j]] + bias[r].

    Args:
        tables: (q, m, k) from `vqlib.adc_tables`.
        codes: (n, m) int codes of the database.
        bias: optional (n,) per-row term, e.g. ||decode(codes)||^2 for L2 with additive codes.

    Returns:
        (q, n) float32 scores.

    Example:
        >>> import jax, vqlib
        >>> x = jax.random.normal(jax.random.key(1), (500, 8))
        >>> cb = vqlib.fit(x, "pq", m=4, k=16)
        >>> vqlib.codebooks.adc_lookup(vqlib.adc_tables(cb, x[:2]), vqlib.encode(cb, x)).shape
        (2, 500)
    """
    tables = _checks.check_float_array(tables, "tables", ndim=3)
    codes = _checks.check_codes(codes, tables.shape[2], width=tables.shape[1])
    if bias is not None:
        bias = _checks.check_float_array(bias, "bias", ndim=1)
        if bias.shape != codes.shape[:1]:
            raise ValueError(f"bias must have shape ({codes.shape[0]},), one value per code row, got {bias.shape}")
    return _lookup(tables.astype(jnp.float32), codes, bias)


# the kernels' reference scoring (one (q, n) gather per codebook: O(q n) memory), compiled
_lookup = jax.jit(adc_scores)
