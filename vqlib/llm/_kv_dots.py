"""The two contractions of attention against a block of keys or values, for any number of queries.

    scores(q, x):  q (b, kvh, g, t, d), x (b, s, kvh, d) -> (b, kvh, g, t, s)   q . x
    mix(p, x):     p (b, kvh, g, t, s), x (b, s, kvh, d) -> (b, kvh, g, t, d)   sum_s p x

A decode step has few queries per key head (g t = 3 for SmolLM2): as a matrix product the
contraction is a batch of 3-row products behind a transpose of x, which XLA:CPU runs at a
fraction of its speed (0.21 ms for a 512-position tile against 0.15 ms as a product and a sum
fused over the tile, measured on the benchmark's Xeon; 0.15 against 0.11 for the values).
Up to `FEW` queries per head the contraction is written elementwise; past it (prefill, a
perplexity window) as einsum, whose product would otherwise be materialised t times."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

FEW = 8  # g * t up to which the elementwise form is used
_HIGHEST = lax.Precision.HIGHEST


def scores(q, x):
    """(b, kvh, g, t, s) dot products of queries q (b, kvh, g, t, d) with x (b, s, kvh, d)."""
    b, kvh, g, t, d = q.shape
    if g * t <= FEW:
        prod = x[:, :, :, None, None, :] * q[:, None]  # (b, s, kvh, g, t, d)
        return jnp.sum(prod, axis=-1).transpose(0, 2, 3, 4, 1)
    return jnp.einsum("bkgtd,bskd->bkgts", q, x, precision=_HIGHEST)


def mix(p, x):
    """(b, kvh, g, t, d) sums over s of p (b, kvh, g, t, s) times x (b, s, kvh, d)."""
    b, kvh, g, t, s = p.shape
    if g * t <= FEW:
        prod = p.transpose(0, 4, 1, 2, 3)[..., None] * x[:, :, :, None, None, :]  # (b, s, kvh, g, t, d)
        return jnp.sum(prod, axis=1)
    return jnp.einsum("bkgts,bskd->bkgtd", p, x, precision=_HIGHEST)
