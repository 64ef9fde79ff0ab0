"""Product quantization (PQ) and optimized PQ (OPQ).

x (d,) is cut into m subvectors of dsub = d / m dimensions; subvector j is coded by the nearest
of k centroids of subspace j, so a vector costs m * log2(k) bits and the codebook spans k**m
points. All m k-means problems are fitted in one compiled call of the batched flash k-means.
OPQ first rotates x by a learned orthogonal R (x -> x R), alternating PQ fits with the
orthogonal Procrustes solution R = U V^T of SVD(X^T X_hat) = U S V^T.

References:
    Jegou, Douze & Schmid, "Product quantization for nearest neighbor search", TPAMI 2011.
    Ge, He, Ke & Sun, "Optimized product quantization", TPAMI 2014.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from vqlib import _checks
from vqlib._types import CodeLayout, pytree_dataclass
from vqlib.codebooks import _kmeans
from vqlib.codebooks._hadamard import random_orthogonal
from vqlib.kernels import first_argmin

METRICS = ("l2", "ip")
_HIGHEST = lax.Precision.HIGHEST


@pytree_dataclass
class ProductCodebook:
    """Per-subspace centroids, with an optional rotation applied before splitting.

    Attributes:
        centroids: (m, k, dsub) float32; subvector j of x @ rotation is coded by centroids[j].
        rotation: (d, d) orthogonal float32 (OPQ) or None (plain PQ).
    """

    centroids: jax.Array
    rotation: jax.Array | None = None


def _split(x, m: int):
    """(n, d) -> (m, n, dsub)."""
    return x.reshape(x.shape[0], m, -1).transpose(1, 0, 2)


def _training_sample(key, x, w, k: int, max_points_per_centroid):
    """At most k * max_points_per_centroid rows of x (and their weights), drawn uniformly."""
    if max_points_per_centroid is None:
        return x, w
    size = k * _checks.check_int(max_points_per_centroid, "max_points_per_centroid", low=1)
    if x.shape[0] <= size:
        return x, w
    rows = jax.random.choice(key, x.shape[0], (size,), replace=False)
    return x[rows], None if w is None else w[rows]


def _rotate(x, rotation):
    return jnp.matmul(x.astype(jnp.float32), rotation, precision="highest")


def _check_subspaces(d: int, m) -> int:
    m = _checks.check_int(m, "m", low=1)
    _checks.check_divisible(d, m)
    return m


def _fit_centroids(key, x, m: int, k: int, sample_weight, **options):
    """One batched k-means call over the m subspaces of x (n, d) -> (m, k, dsub)."""
    w = None if sample_weight is None else jnp.broadcast_to(sample_weight, (m, x.shape[0]))
    return _kmeans.fit_kmeans_batched(key, _split(x, m), k=k, sample_weight=w, **options).centroids


def fit_pq(
    key,
    x,
    *,
    m: int,
    k: int = 256,
    max_iter: int = 25,
    tol: float = 1e-4,
    init="k-means++",
    sample_weight=None,
    max_points_per_centroid: int | None = 256,
    impl: str = "auto",
) -> ProductCodebook:
    """Fits m k-means codebooks, one per subspace, in one batched call.

    Args:
        key: PRNG key (training sample, k-means++ seeds).
        x: (n, d) training vectors; d must be divisible by m.
        m: number of subspaces (codes per vector).
        k: centroids per subspace (256 = one byte per code).
        max_iter: Lloyd iterations per subspace (faiss's ProductQuantizer default: 25).
        tol: stop a subspace's k-means when its inertia improves by less than this (relative).
        init: "k-means++", "random" or an (m, k, dsub) array.
        sample_weight: (n,) non-negative weights of the training vectors.
        max_points_per_centroid: train on at most this many points per centroid, sampled
            uniformly (faiss's default, 256); None trains on all of x.
        impl: assignment backend.

    Returns:
        ProductCodebook with centroids (m, k, dsub) and rotation None.

    Example:
        >>> import jax, vqlib
        >>> x = jax.random.normal(jax.random.key(1), (2000, 16))
        >>> cb = vqlib.fit(x, "pq", m=4, k=16)
        >>> cb.centroids.shape, vqlib.encode(cb, x).shape
        ((4, 16, 4), (2000, 4))
    """
    x = _checks.check_float_array(x, "x", ndim=2)
    m = _check_subspaces(x.shape[1], m)
    k = _checks.check_num_codes(k, x.shape[0])
    w = _checks.check_sample_weight(sample_weight, x.shape[0])
    sample_key, fit_key = jax.random.split(key)
    x, w = _training_sample(sample_key, x, w, k, max_points_per_centroid)
    centroids = _fit_centroids(fit_key, x, m, k, w, init=init, max_iter=max_iter, tol=tol, impl=impl)
    return ProductCodebook(centroids)


def _procrustes(x, x_hat):
    """The orthogonal R minimising ||x R - x_hat||_F: U V^T from SVD(x^T x_hat)."""
    u, _, vt = jnp.linalg.svd(jnp.matmul(x.T, x_hat, precision="highest"), full_matrices=False)
    return jnp.matmul(u, vt, precision="highest")


def fit_opq(
    key,
    x,
    *,
    m: int,
    k: int = 256,
    num_iters: int = 50,
    max_iter: int = 4,
    max_iter_first: int = 40,
    init_rotation: str = "random",
    sample_weight=None,
    max_points_per_centroid: int | None = 256,
    impl: str = "auto",
) -> ProductCodebook:
    """Optimized PQ: alternates a PQ fit on x R with the Procrustes update of R.

    The defaults are faiss's OPQMatrix (niter 50, niter_pq 4, niter_pq_0 40, a random initial
    rotation): each round warm starts k-means from the previous centroids.

    Args:
        key: PRNG key.
        x: (n, d) training vectors, d divisible by m.
        m, k: as for `fit_pq`.
        num_iters: alternations of (PQ fit, rotation update).
        max_iter: Lloyd iterations per PQ fit after the first; max_iter_first for the first and
            for the last, on the final rotation.
        init_rotation: "random" (Haar, spreads the variance evenly over the subspaces) or
            "identity" (starts from plain PQ; better when the dimensions are already balanced).
        sample_weight: (n,) non-negative weights (the Procrustes step weights rows by them too).
        max_points_per_centroid: training sample per centroid, as for `fit_pq`.
        impl: assignment backend.

    Returns:
        ProductCodebook with centroids (m, k, dsub) and rotation (d, d).

    Example:
        >>> import jax, vqlib
        >>> x = jax.random.normal(jax.random.key(1), (2000, 16))
        >>> cb = vqlib.fit(x, "opq", m=4, k=16, num_iters=3)
        >>> cb.rotation.shape
        (16, 16)
    """
    x = _checks.check_float_array(x, "x", ndim=2).astype(jnp.float32)
    m = _check_subspaces(x.shape[1], m)
    k = _checks.check_num_codes(k, x.shape[0])
    num_iters = _checks.check_int(num_iters, "num_iters", low=0)
    max_iter = _checks.check_int(max_iter, "max_iter", low=0)
    w = _checks.check_sample_weight(sample_weight, x.shape[0])
    sample_key, key = jax.random.split(key)
    x, w = _training_sample(sample_key, x, w, k, max_points_per_centroid)
    if init_rotation not in ("random", "identity"):
        raise ValueError(f"init_rotation must be 'random' or 'identity', got {init_rotation!r}")
    rotation_key, key = jax.random.split(key)
    rotation = jnp.eye(x.shape[1], dtype=jnp.float32)
    if init_rotation == "random":
        rotation = random_orthogonal(rotation_key, x.shape[1])
    keys = jax.random.split(key, num_iters + 1)
    # fixed iteration counts (tol=0), as faiss: a warm-started k-means improves by less than any
    # relative tol in its first step and would stop there (measured: MSE 8.49 with tol 1e-4, 8.35 without)
    fit = functools.partial(_fit_centroids, m=m, k=k, sample_weight=w, tol=0.0, impl=impl)
    centroids = fit(keys[0], _rotate(x, rotation), max_iter=max_iter_first)
    sqrt_w = jnp.ones((x.shape[0], 1), jnp.float32) if w is None else jnp.sqrt(w)[:, None]
    for key in keys[1:]:
        x_hat = _decode(centroids, _encode(centroids, _rotate(x, rotation)))
        rotation = _procrustes(sqrt_w * x, sqrt_w * x_hat)
        centroids = fit(key, _rotate(x, rotation), init=centroids, max_iter=max_iter)
    if num_iters:  # the rotation is final: converge the PQ on it (faiss trains a fresh PQ here)
        centroids = fit(keys[0], _rotate(x, rotation), init=centroids, max_iter=max_iter_first)
    return ProductCodebook(centroids, rotation)


@jax.jit
def _encode(centroids, x):
    """(n, d) -> (n, m) codes. Per chunk of rows, the scores ||c||^2 - 2 <x_j, c> of all m
    subspaces come from one batched dot, laid out (m, chunk, k), then the first index of each
    minimum. Measured about 2x faster than m separate tiled assignments, whose dots (dsub of 4-16)
    are too thin for the matrix units, and than jnp.argmin (a variadic reduce on XLA:CPU)."""
    m, k, dsub = centroids.shape
    n = x.shape[0]
    chunk = min(n, max(1, 2**22 // (m * k)))  # (m, chunk, k) scores: 16 MB
    norms = jnp.sum(centroids * centroids, axis=-1)[:, None, :]  # (m, 1, k)

    def codes_of(rows):  # (chunk, d) -> (chunk, m)
        xs = rows.astype(jnp.float32).reshape(chunk, m, dsub).transpose(1, 0, 2)
        scores = norms - 2.0 * jnp.einsum("mcd,mkd->mck", xs, centroids, precision=_HIGHEST)
        return first_argmin(scores, axis=-1)[1].T

    padded = jnp.pad(x, ((0, -n % chunk), (0, 0)))
    return lax.map(codes_of, padded.reshape(-1, chunk, x.shape[1])).reshape(-1, m)[:n]


@jax.jit
def _decode(centroids, codes):
    """(n, m) codes -> (n, d): subvectors gathered per subspace and concatenated."""
    parts = jax.vmap(lambda c, j: jnp.take(c, j, axis=0), in_axes=(0, 1), out_axes=1)(centroids, codes)
    return parts.reshape(codes.shape[0], -1)


def _dim(cb: ProductCodebook) -> int:
    return cb.centroids.shape[0] * cb.centroids.shape[2]


def encode(cb: ProductCodebook, x) -> jax.Array:
    """(n, d) vectors -> (n, m) int32 codes: the nearest centroid of each (rotated) subvector."""
    _checks.check_rank(cb.centroids, 3, "cb.centroids", "; a batch of codebooks: use jax.vmap(vqlib.encode)")
    x = _checks.check_float_array(x, "x", ndim=2)
    _checks.check_dim(x, _dim(cb))
    if cb.rotation is not None:
        x = _rotate(x, cb.rotation)
    return _encode(cb.centroids, x)


def decode(cb: ProductCodebook, codes) -> jax.Array:
    """(n, m) codes -> (n, d) float32 reconstructions (rotated back for OPQ)."""
    m, k, _ = cb.centroids.shape
    codes = _checks.check_codes(codes, k, width=m)
    x_hat = _decode(cb.centroids, codes)
    if cb.rotation is not None:
        x_hat = _rotate(x_hat, cb.rotation.T)
    return x_hat


def layout(cb: ProductCodebook) -> CodeLayout:
    return CodeLayout(cb.centroids.shape[0], cb.centroids.shape[1])


def adc_tables(cb: ProductCodebook, queries, *, metric: str = "l2") -> jax.Array:
    """Queries (q, d) -> (q, m, k) tables: the distance from query i to a code row b is
    sum_j tables[i, j, b[j]], exactly ||q_i - decode(b)||^2 ("l2") or <q_i, decode(b)> ("ip")."""
    queries = _checks.check_float_array(queries, "queries", ndim=2)
    _checks.check_dim(queries, _dim(cb), "queries")
    if cb.rotation is not None:
        queries = _rotate(queries, cb.rotation)
    return _tables(cb.centroids, queries.astype(jnp.float32), metric=check_metric(metric))


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


@functools.partial(jax.jit, static_argnames="metric")
def _tables(centroids, queries, *, metric: str):
    qs = _split(queries, centroids.shape[0])  # (m, q, dsub)
    dots = jnp.einsum("mqd,mkd->qmk", qs, centroids, precision="highest")
    if metric == "ip":
        return dots
    q_norms = jnp.sum(qs * qs, axis=-1).T[:, :, None]  # (q, m, 1)
    return jnp.maximum(q_norms - 2.0 * dots + jnp.sum(centroids * centroids, axis=-1)[None], 0.0)
