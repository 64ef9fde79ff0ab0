"""The semantics of `assign`, written plainly: materialises the (n, k) distance matrix."""

import jax
import jax.numpy as jnp


@jax.jit
def assign_reference(x: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nearest centroid by squared Euclidean distance; ties go to the lowest index.

    Args:
        x: (n, d) points, any float dtype.
        centroids: (k, d) centroids, any float dtype.

    Returns:
        codes: (n,) int32, argmin_j ||x_i - c_j||^2.
        dists: (n,) float32, that minimum, clamped at 0.
    """
    x32 = x.astype(jnp.float32)
    c32 = centroids.astype(jnp.float32)
    d2 = (
        jnp.sum(x32 * x32, axis=1)[:, None]
        - 2.0 * jnp.dot(x32, c32.T, precision="highest")
        + jnp.sum(c32 * c32, axis=1)[None, :]
    )
    codes = jnp.argmin(d2, axis=1).astype(jnp.int32)
    return codes, jnp.maximum(jnp.min(d2, axis=1), 0.0)
