"""The lowest index of the minimum along an axis, both from one reduction.

The tempting two-reduction form (the minimum, then the smallest index whose value equals it)
is wrong under XLA: the compiler may fuse the producer of `scores` into each reduction
separately and round the two copies differently (a fused multiply-add in one copy, not in the
other, once a thin dot has been simplified into elementwise products), so that no index equals
the minimum and the result is out of range (seen: k-means codes equal to k, PQ codes equal to
k at one dimension per subspace). `lax.optimization_barrier` does not prevent it on XLA:CPU.
A single variadic reduction over (value, index) pairs reads each value once.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int32


def first_argmin(scores: Float[ArrayLike, "..."], axis: int = -1) -> tuple[Float[Array, "..."], Int32[Array, "..."]]:
    """(minimum, lowest index attaining it) of float `scores` along `axis`; the index is int32.

    Example:
        >>> import jax.numpy as jnp
        >>> from vqlib.kernels import first_argmin
        >>> [a.tolist() for a in first_argmin(jnp.array([[3.0, 1.0, 1.0], [0.0, 2.0, 0.0]]))]
        [[1.0, 0.0], [1, 0]]
    """
    index = jnp.argmin(scores, axis=axis, keepdims=True)
    best = jnp.take_along_axis(scores, index, axis=axis)
    return jnp.squeeze(best, axis), jnp.squeeze(index, axis).astype(jnp.int32)
