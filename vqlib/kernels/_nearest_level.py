"""The nearest of a few sorted scalar levels, for every entry of an array (scalar quantisation).

Counting the cell boundaries (midpoints of adjacent levels) below each entry is one fused pass
with k - 1 comparisons per entry; `jnp.searchsorted` runs a binary search whose every step is a
gather, 8-10x slower on XLA:CPU (measured: 2.2 s against 0.22 s for 46M entries and 16 levels).
The comparisons are unrolled, one elementwise op per boundary, so that XLA:CPU vectorises along
x's contiguous axis; summed over a trailing boundary axis they ran 3.7x slower (0.42 s against
0.115 s for 46M entries and 16 levels, on a loaded 2-core Xeon).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int32

UNROLLED = 64  # up to this many boundaries (6-bit levels), one comparison per boundary, unrolled


def nearest_level(x: Float[ArrayLike, "..."], levels: Float[ArrayLike, " k"]) -> Int32[Array, "..."]:
    """Index of the nearest of `levels` (sorted ascending) for every entry of x; an entry exactly
    halfway between two levels goes to the lower one.

    Example:
        >>> import jax.numpy as jnp
        >>> from vqlib.kernels import nearest_level
        >>> nearest_level(jnp.array([-2.0, 0.0, 0.5, 0.6, 9.0]), jnp.array([-1.0, 0.0, 1.0])).tolist()
        [0, 1, 1, 2, 2]
    """
    levels = jnp.asarray(levels)
    x = jnp.asarray(x)
    bounds = (levels[1:] + levels[:-1]) / 2
    if bounds.shape[0] > UNROLLED:
        return jnp.sum(x[..., None] > bounds.reshape((1,) * x.ndim + bounds.shape), axis=-1, dtype=jnp.int32)
    count = jnp.zeros(x.shape, jnp.int32)
    for j in range(bounds.shape[0]):  # elementwise along x's own axes: 3.7x the summed comparison's speed
        count = count + (x > bounds[j]).astype(jnp.int32)
    return count
