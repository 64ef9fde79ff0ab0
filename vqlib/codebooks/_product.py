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
from jaxtyping import Array, ArrayLike, Float, Int

from vqlib import _checks
from vqlib._types import CodeLayout, pytree_dataclass
from vqlib.codebooks import _kmeans, _protocol
from vqlib.codebooks._hadamard import Rotation, random_orthogonal, rotate, unrotate
from vqlib.codebooks._sampling import training_sample
from vqlib.kernels import assign_subspaces, fitting_impl
from vqlib.kernels import lut_weight as lut_weight_op


@pytree_dataclass
class ProductCodebook:
    """Per-subspace centroids, with an optional rotation applied before splitting.

    Attributes:
        centroids: (m, k, dsub) float32; subvector j of rotate(rotation, x) is coded by centroids[j].
        rotation: the OPQ rotation (a dense `Rotation`: x -> x R with R = factor^T) or None (plain PQ).
    """

    centroids: jax.Array
    rotation: Rotation | None = None


def _split(x, m: int):
    """(n, d) -> (m, n, dsub)."""
    return x.reshape(x.shape[0], m, -1).transpose(1, 0, 2)


def _rotate(x, r):
    """x R for a (d, d) matrix R (the row-vector form of OPQ's rotation)."""
    return jnp.matmul(x.astype(jnp.float32), r, precision="highest")


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
    x: Float[ArrayLike, "n d"],
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
        impl: assignment backend ("auto": `vqlib.kernels.fitting_impl`, faiss on CPU for large fits).

    Returns:
        ProductCodebook with centroids (m, k, dsub) and rotation None.

    Example:
        >>> import jax, vqlib
        >>> x = jax.random.normal(jax.random.key(1), (2000, 16))
        >>> cb = vqlib.fit(x, "pq", m=4, k=16)
        >>> cb.centroids.shape, vqlib.encode(cb, x).shape
        ((4, 16, 4), (2000, 4))
    """
    x = _checks.check_float_array(x, "x", ndim=2, vectors=True)
    m = _check_subspaces(x.shape[1], m)
    k = _checks.check_num_codes(k, x.shape[0])
    w = _checks.check_sample_weight(sample_weight, x.shape[0])
    sample_key, fit_key = jax.random.split(key)
    x, w = training_sample(sample_key, x, w, k, max_points_per_centroid)
    if impl == "auto":
        impl = fitting_impl(x.shape[1] // m, x.shape[0], k)
    centroids = _fit_centroids(fit_key, x, m, k, w, init=init, max_iter=max_iter, tol=tol, impl=impl)
    return ProductCodebook(centroids)


def _procrustes(x, x_hat):
    """The orthogonal R minimising ||x R - x_hat||_F: U V^T from SVD(x^T x_hat)."""
    u, _, vt = jnp.linalg.svd(jnp.matmul(x.T, x_hat, precision="highest"), full_matrices=False)
    return jnp.matmul(u, vt, precision="highest")


def fit_opq(
    key,
    x: Float[ArrayLike, "n d"],
    *,
    m: int,
    k: int = 256,
    max_iter: int = 50,
    kmeans_iter: int = 4,
    kmeans_iter_first: int = 40,
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
        max_iter: alternations of (PQ fit, rotation update).
        kmeans_iter: Lloyd iterations per PQ fit after the first; kmeans_iter_first for the
            first and for the last, on the final rotation.
        init_rotation: "random" (Haar, spreads the variance evenly over the subspaces) or
            "identity" (starts from plain PQ; better when the dimensions are already balanced).
        sample_weight: (n,) non-negative weights (the Procrustes step weights rows by them too).
        max_points_per_centroid: training sample per centroid, as for `fit_pq`.
        impl: assignment backend ("auto": `vqlib.kernels.fitting_impl`, faiss on CPU for large fits).

    Returns:
        ProductCodebook with centroids (m, k, dsub) and a dense rotation of R^d.

    Example:
        >>> import jax, vqlib
        >>> x = jax.random.normal(jax.random.key(1), (2000, 16))
        >>> cb = vqlib.fit(x, "opq", m=4, k=16, max_iter=3)
        >>> cb.rotation.factor.shape
        (16, 16)
    """
    x = _checks.check_float_array(x, "x", ndim=2, vectors=True).astype(jnp.float32)
    m = _check_subspaces(x.shape[1], m)
    k = _checks.check_num_codes(k, x.shape[0])
    max_iter = _checks.check_int(max_iter, "max_iter", low=0)
    kmeans_iter = _checks.check_int(kmeans_iter, "kmeans_iter", low=0)
    kmeans_iter_first = _checks.check_int(kmeans_iter_first, "kmeans_iter_first", low=0)
    w = _checks.check_sample_weight(sample_weight, x.shape[0])
    sample_key, key = jax.random.split(key)
    x, w = training_sample(sample_key, x, w, k, max_points_per_centroid)
    if init_rotation not in ("random", "identity"):
        raise ValueError(f"init_rotation must be 'random' or 'identity', got {init_rotation!r}")
    rotation_key, key = jax.random.split(key)
    rotation = jnp.eye(x.shape[1], dtype=jnp.float32)
    if init_rotation == "random":
        rotation = random_orthogonal(rotation_key, x.shape[1])
    keys = jax.random.split(key, max_iter + 1)
    # fixed iteration counts (tol=0), as faiss: a warm-started k-means improves by less than any
    # relative tol in its first step and would stop there (measured: MSE 8.49 with tol 1e-4, 8.35 without)
    if impl == "auto":
        impl = fitting_impl(x.shape[1] // m, x.shape[0], k)
    fit = functools.partial(_fit_centroids, m=m, k=k, sample_weight=w, tol=0.0, impl=impl)
    centroids = fit(keys[0], _rotate(x, rotation), max_iter=kmeans_iter_first)
    sqrt_w = jnp.ones((x.shape[0], 1), jnp.float32) if w is None else jnp.sqrt(w)[:, None]
    for key in keys[1:]:
        x_hat = _decode(centroids, _encode(centroids, _rotate(x, rotation)))
        rotation = _procrustes(sqrt_w * x, sqrt_w * x_hat)
        centroids = fit(key, _rotate(x, rotation), init=centroids, max_iter=kmeans_iter)
    if max_iter:  # the rotation is final: converge the PQ on it (faiss trains a fresh PQ here)
        centroids = fit(keys[0], _rotate(x, rotation), init=centroids, max_iter=kmeans_iter_first)
    return ProductCodebook(centroids, rotation_from_matrix(rotation))


def rotation_from_matrix(r) -> Rotation:
    """The dense Rotation x -> x R of an orthogonal (d, d) matrix R (OPQ's row-vector form)."""
    r = jnp.asarray(r, jnp.float32)
    return Rotation(jnp.ones((r.shape[0],), jnp.float32), r.T)


def _encode(centroids, x):
    """(n, d) -> (n, m) codes through the kernels' dispatcher (faiss-cpu on CPU, XLA elsewhere)."""
    return assign_subspaces(x, centroids)


@jax.jit
def _decode(centroids, codes):
    """(n, m) codes -> (n, d): subvectors gathered per subspace and concatenated."""
    parts = jax.vmap(lambda c, j: jnp.take(c, j, axis=0), in_axes=(0, 1), out_axes=1)(centroids, codes)
    return parts.reshape(codes.shape[0], -1)


def _dim(cb: ProductCodebook) -> int:
    return cb.centroids.shape[0] * cb.centroids.shape[2]


def _rotated(cb: ProductCodebook, x):
    return x.astype(jnp.float32) if cb.rotation is None else rotate(cb.rotation, x)


def encode(cb: ProductCodebook, x: Float[Array, "n d"]) -> Int[Array, "n m"]:
    """(n, d) vectors -> (n, m) int32 codes: the nearest centroid of each (rotated) subvector."""
    _checks.check_rank(cb.centroids, 3, "cb.centroids", "; a batch of codebooks: use jax.vmap(vqlib.encode)")
    return _encode(cb.centroids, _rotated(cb, x))


def decode(cb: ProductCodebook, codes: Int[Array, "n m"]) -> Float[Array, "n d"]:
    """(n, m) codes -> (n, d) float32 reconstructions (rotated back for OPQ)."""
    x_hat = _decode(cb.centroids, codes)
    return x_hat if cb.rotation is None else unrotate(cb.rotation, x_hat)


def layout(cb: ProductCodebook) -> CodeLayout:
    return CodeLayout(cb.centroids.shape[0], cb.centroids.shape[1])


def ip_tables(cb: ProductCodebook, queries: Float[Array, "q d"]) -> Float[Array, "q m k"]:
    """tables[i, j, c] = <subvector j of the rotated query i, centroids[j, c]>."""
    return _tables(cb.centroids, _rotated(cb, queries), metric="ip")


def l2_tables(cb: ProductCodebook, queries: Float[Array, "q d"]) -> Float[Array, "q m k"]:
    """tables[i, j, c] = ||subvector j of the rotated query i - centroids[j, c]||^2: the sum over j
    is ||q - decode(code)||^2 exactly (the rotation is orthogonal)."""
    return _tables(cb.centroids, _rotated(cb, queries), metric="l2")


@functools.partial(jax.jit, static_argnames="metric")
def _tables(centroids, queries, *, metric: str):
    qs = _split(queries, centroids.shape[0])  # (m, q, dsub)
    dots = jnp.einsum("mqd,mkd->qmk", qs, centroids, precision="highest")
    if metric == "ip":
        return dots
    q_norms = jnp.sum(qs * qs, axis=-1).T[:, :, None]  # (q, m, 1)
    return jnp.maximum(q_norms - 2.0 * dots + jnp.sum(centroids * centroids, axis=-1)[None], 0.0)


def lut_weight(cb: ProductCodebook, codes: Int[Array, "n m"], shape: tuple[int, int]):
    """PQ of weight rows (or of chunks of d columns): one codebook per column block of dsub."""
    if cb.rotation is not None:
        raise NotImplementedError("an OPQ codebook has no LUTWeight form: rotate the activations and use plain PQ")
    out, cols = shape
    m, _, dsub = cb.centroids.shape
    return lut_weight_op("vq", codes.reshape(1, out, cols // dsub), cb.centroids)


def validate(cb: ProductCodebook) -> None:
    _checks.check_float_dtype(cb.centroids, "centroids")
    if cb.centroids.ndim != 3 or min(cb.centroids.shape) < 1:
        raise ValueError(f"centroids must be (m, k, dsub) with every size >= 1, got {cb.centroids.shape}")
    if cb.rotation is not None and cb.rotation.signs.shape != (_dim(cb),):
        raise ValueError(f"rotation acts on d={cb.rotation.signs.shape[0]}, the centroids on d={_dim(cb)}")


_protocol.register(
    ProductCodebook,
    methods={"pq": fit_pq, "opq": fit_opq},
    encode=encode,
    decode=decode,
    layout=layout,
    dim=_dim,
    ip_tables=ip_tables,
    l2_tables=l2_tables,
    lut_weight=lut_weight,
    validate=validate,
)
