"""`assign` by faiss-cpu: its exhaustive L2 search (one BLAS product, then the top-1 per point),
called through `jax.pure_callback`, so it runs inside jit and vmap (a batch of problems is a host
loop of faiss calls). Same contract as `assign_reference`: float32 squared distances clamped at 0,
ties to the lowest index (faiss keeps the first minimum it meets, scanning centroids in order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _host_assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    if x.ndim == 3:  # a vmapped batch: one faiss call per problem
        parts = [_host_assign(a, c) for a, c in zip(x, centroids, strict=True)]
        return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
    # the callback gets jax arrays: view them first (zero-copy on CPU; see subspaces._host_codes)
    x = np.ascontiguousarray(np.asarray(x), np.float32)
    c = np.ascontiguousarray(np.asarray(centroids), np.float32)
    dists, codes = faiss.knn(x, c, 1)
    return codes[:, 0].astype(np.int32), np.maximum(dists[:, 0], 0.0).astype(np.float32)


def assign(x: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Same contract as `assign_reference`; computed on the host by faiss in float32."""
    n = x.shape[0]
    shapes = (jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.float32))
    return jax.pure_callback(
        _host_assign, shapes, x.astype(jnp.float32), centroids.astype(jnp.float32), vmap_method="broadcast_all"
    )
