"""`assign_subspaces`: the nearest centroid of each of a vector's m subvectors (product
quantisation's encoding), one assignment problem per subspace, ties to the lowest index.

Backends: "xla" (one batched dot per chunk of rows for all m subspaces, then the first minimum),
"reference" (`assign_reference` per subspace) and "faiss" (faiss-cpu's exhaustive search per
subspace, through `jax.pure_callback`). "auto" takes faiss on CPU when it is importable: with
subvectors of 4-16 dimensions each score is a short dot that XLA:CPU runs far below faiss's
BLAS + SIMD loops (measured, 100,000 x 128 clustered vectors, 16 subspaces of 256 centroids,
2-core Xeon: XLA 2.28 s, faiss 0.28 s, the same codes; benchmarks/codebooks_cpu.py), from 2**22
distances per subspace (`prefer_faiss`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Int32

from vqlib import _checks
from vqlib.kernels import _dispatch
from vqlib.kernels._argmin import first_argmin
from vqlib.kernels._assign.reference import assign_reference

BACKENDS = {
    "xla": "vqlib.kernels._assign.subspaces:assign_subspaces_xla",
    "reference": "vqlib.kernels._assign.subspaces:assign_subspaces_reference",
    "faiss": "vqlib.kernels._assign.subspaces:assign_subspaces_faiss",
}


def assign_subspaces(
    x: Float[ArrayLike, "n d"], centroids: Float[ArrayLike, "m k dsub"], *, impl: str = "auto"
) -> Int32[Array, "n m"]:
    """codes[i, j] = argmin_c ||x_i[j dsub : (j + 1) dsub] - centroids[j, c]||^2, ties to the
    lowest c.

    Args:
        x: (n, m * dsub) float vectors.
        centroids: (m, k, dsub) float centroids of each subspace.
        impl: "auto" (faiss on CPU when importable, else "xla"), "xla", "reference" or "faiss".

    Returns:
        (n, m) int32 codes.

    Example:
        >>> import jax.numpy as jnp
        >>> from vqlib.kernels import assign_subspaces
        >>> c = jnp.array([[[0.0], [1.0]], [[0.0], [1.0]]])  # 2 subspaces of 2 centroids
        >>> assign_subspaces(jnp.array([[0.9, 0.1]]), c, impl="xla").tolist()
        [[1, 0]]
    """
    x = _checks.check_float_array(x, "x", vectors=True)
    centroids = _checks.check_float_array(centroids, "centroids", vectors=True)
    _checks.check_rank(x, 2, "x", "; use jax.vmap for a batch of problems")
    _checks.check_rank(centroids, 3, "centroids", " (m, k, dsub)")
    m, _, dsub = centroids.shape
    _checks.check_dim(x, m * dsub, what="m * dsub of the centroids is")
    return _dispatch.dispatch(
        "assign_subspaces", impl, BACKENDS, (x, centroids), interpret=False, prefer_faiss=prefer_faiss
    )


def prefer_faiss(x, centroids) -> bool:
    """Where "auto" on CPU hands the encoding to faiss: from 2**22 distances per subspace. A program
    holding a host callback is not kept by JAX's persistent compilation cache, so each process
    compiles it again (0.3-1 s); below that size XLA's cached program wins (PQ fast-scan build of
    100k GloVe vectors, 16 centroids: 2.4 s in a later process with faiss, 1.8 s without)."""
    return x.shape[0] * centroids.shape[1] >= 2**22


@jax.jit
def assign_subspaces_reference(x, centroids):
    """`assign_reference` on each subspace (materialises (n, k) distances per subspace)."""
    m, _, dsub = centroids.shape
    parts = x.reshape(x.shape[0], m, dsub).transpose(1, 0, 2)
    return jax.vmap(lambda xs, c: assign_reference(xs, c)[0], out_axes=1)(parts, centroids)


@jax.jit
def assign_subspaces_xla(x, centroids):
    """Per chunk of rows, the scores ||c||^2 - 2 <x_j, c> of all m subspaces from one batched dot
    laid out (m, chunk, k), then the first index of each minimum (about 2x faster than m separate
    tiled assignments, whose dots are too thin for the matrix units, and than jnp.argmin)."""
    m, k, dsub = centroids.shape
    n = x.shape[0]
    if n == 0:
        return jnp.zeros((0, m), jnp.int32)
    chunk = min(n, max(1, 2**22 // (m * k)))  # (m, chunk, k) scores: 16 MB
    c32 = centroids.astype(jnp.float32)
    norms = jnp.sum(c32 * c32, axis=-1)[:, None, :]  # (m, 1, k)

    def codes_of(rows):  # (chunk, d) -> (chunk, m)
        xs = rows.astype(jnp.float32).reshape(chunk, m, dsub).transpose(1, 0, 2)
        scores = norms - 2.0 * jnp.einsum("mcd,mkd->mck", xs, c32, precision=lax.Precision.HIGHEST)
        return first_argmin(scores, axis=-1)[1].T

    padded = jnp.pad(x, ((0, -n % chunk), (0, 0)))
    return lax.map(codes_of, padded.reshape(-1, chunk, x.shape[1])).reshape(-1, m)[:n]


def _host_codes(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    import faiss

    if x.ndim == 3:  # a vmapped batch: one call per problem
        return np.stack([_host_codes(a, c) for a, c in zip(x, centroids, strict=True)])
    m, k, dsub = centroids.shape
    # the callback gets jax arrays: np.asarray views their buffers (zero-copy on CPU), where
    # np.ascontiguousarray(jax array) went through a copy (67 of 233 ms of a 100k x 128 encode)
    x = np.ascontiguousarray(np.asarray(x), np.float32)
    centroids = np.asarray(centroids)
    if k == 256:  # one byte per code: faiss's own PQ encoder (benchmark: 303k vectors/s against 280k by knn)
        pq = faiss.ProductQuantizer(m * dsub, m, 8)
        faiss.copy_array_to_vector(np.ascontiguousarray(centroids, np.float32).ravel(), pq.centroids)
        return pq.compute_codes(x).astype(np.int32)
    out = np.empty((x.shape[0], m), np.int32)
    for j in range(m):
        part = np.ascontiguousarray(x[:, j * dsub : (j + 1) * dsub])
        out[:, j] = faiss.knn(part, np.ascontiguousarray(centroids[j], np.float32), 1)[1][:, 0]
    return out


def assign_subspaces_faiss(x, centroids):
    """faiss's exhaustive L2 search per subspace on the host (`faiss.knn` keeps the first minimum it
    meets, scanning centroids in order: ties to the lowest index; the tie test covers it, not the
    ProductQuantizer path of 256 centroids). The codes carry no gradient."""
    shape = jax.ShapeDtypeStruct((x.shape[0], centroids.shape[0]), jnp.int32)
    return jax.pure_callback(
        _host_codes,
        shape,
        lax.stop_gradient(x).astype(jnp.float32),
        lax.stop_gradient(centroids).astype(jnp.float32),
        vmap_method="broadcast_all",
    )
