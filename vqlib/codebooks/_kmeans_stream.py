"""k-means on data larger than memory: exact Lloyd passes over chunks, or mini-batch updates.

The data is read chunk by chunk, from an array-like (a numpy memmap, an on-disk array, a
`jax.Array`) sliced in row ranges, or from a callable that returns a fresh iterable of (m, d)
chunks on every call (one call per pass). Device memory holds one chunk and the (k, d)
statistics; every chunk is padded to `chunk_size` rows with zero weight, so one compiled
pass serves them all.

- exact (default): each pass merges the chunks' `PassStats` statistics, then makes one Lloyd
  update: the same iterates as `fit_kmeans` on the concatenated data, up to float32
  summation order.
- `minibatch=True`: after every chunk, each centroid moves to the running weighted mean of all
  points it has received (the per-centre learning rate 1/count of Sculley 2010 and
  scikit-learn's MiniBatchKMeans); empty clusters re-seed from the chunk's far points.

References:
    Sculley, "Web-scale k-means clustering", WWW 2010.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from vqlib import _checks
from vqlib._progress import progress
from vqlib.codebooks._kmeans import (
    INITS,
    KMeansCodebook,
    KMeansStats,
    default_init_sample_size,
    initial_centroids,
    merge_stats,
    pass_stats,
    update_centroids,
)


def _chunks(data, chunk_size: int) -> Iterable:
    if callable(data):
        return data()
    return (data[i : i + chunk_size] for i in range(0, data.shape[0], chunk_size))


def _padded(chunk, chunk_size: int, d: int):
    """Chunk (m, d) -> float32 (chunk_size, d) points and weights, zero weight on padding rows."""
    chunk = np.asarray(chunk)
    if chunk.ndim != 2 or chunk.shape[1] != d or not 0 < chunk.shape[0] <= chunk_size:
        raise ValueError(
            f"every chunk must have shape (m, {d}) with 0 < m <= chunk_size={chunk_size} "
            f"(d as in init and the first chunk), got {chunk.shape}"
        )
    _checks.check_float_dtype(chunk, "data chunk")
    _checks.check_finite(chunk, "data chunk")
    _checks.check_scale(chunk, "data chunk")
    m = chunk.shape[0]
    x = np.zeros((chunk_size, d), np.float32)
    x[:m] = chunk
    w = np.zeros((chunk_size,), np.float32)
    w[:m] = 1.0
    return jnp.asarray(x), jnp.asarray(w)


def _reservoir(data, chunk_size: int, size: int, rng: np.random.Generator):
    """Uniform sample of `size` rows without replacement in one pass (smallest random priorities)."""
    kept, priorities, n = None, None, 0
    for chunk in _chunks(data, chunk_size):
        chunk = np.asarray(chunk, np.float32)
        n += chunk.shape[0]
        p = rng.random(chunk.shape[0])
        kept = chunk if kept is None else np.concatenate([kept, chunk])
        priorities = p if priorities is None else np.concatenate([priorities, p])
        if kept.shape[0] > size:
            keep = np.argpartition(priorities, size)[:size]
            kept, priorities = kept[keep], priorities[keep]
    return kept, n


@functools.partial(jax.jit, static_argnames=("num_far", "impl"))
def _chunk_stats(x, w, centroids, *, num_far, impl):
    return pass_stats(x, w, centroids, num_far=num_far, update="auto", impl=impl)


@jax.jit
def _minibatch_step(centroids, seen, p):
    """Running-mean update: each centroid becomes the mean of every point it has been given."""
    total = seen + p.counts
    new, num_reseeded = update_centroids(centroids, p._replace(sums=centroids * seen[:, None] + p.sums, counts=total))
    return new, total, num_reseeded


def fit_kmeans_streaming(
    key,
    data: np.ndarray | Callable[[], Iterable],
    *,
    k: int,
    chunk_size: int = 65_536,
    init="k-means++",
    max_iter: int = 20,
    tol: float = 1e-4,
    minibatch: bool = False,
    init_sample_size: int | None = None,
    verbose: bool = False,
    impl: str = "auto",
) -> KMeansCodebook:
    """k-means over chunks of data that need not fit in memory.

    Args:
        key: PRNG key for the initial sample and k-means++.
        data: an (n, d) array-like sliceable by rows (np.memmap, np.ndarray, jax.Array) or a
            callable returning an iterable of (m, d) float chunks, m <= chunk_size.
        k: number of centroids.
        chunk_size: rows per device step; memory is O(chunk_size * d + k * d).
        init: "k-means++" or "random" on a one-pass uniform sample of `init_sample_size`
            rows, or an array (k, d).
        max_iter: passes over the data (Lloyd updates, or mini-batch epochs).
        tol: stop when the relative decrease of the per-pass inertia falls below tol.
        minibatch: update after every chunk instead of after every pass.
        verbose: draw a progress bar per pass on stderr.

    Returns:
        KMeansCodebook; stats.inertia[t] is the inertia measured during pass t (for exact
        passes: of the centroids after t updates, as in `fit_kmeans`).

    Example:
        >>> import numpy as np, jax, vqlib
        >>> x = np.random.default_rng(0).normal(size=(10_000, 8)).astype("float32")
        >>> cb = vqlib.codebooks.fit_kmeans_streaming(jax.random.key(0), x, k=32, chunk_size=4096)
        >>> cb.centroids.shape
        (32, 8)
    """
    if not callable(data) and not hasattr(data, "shape"):
        raise TypeError(
            f"data must be an (n, d) array-like or a callable returning a fresh iterable of chunks, got "
            f"{type(data).__name__}; an iterator can be read only once, so wrap it: data=lambda: make_chunks()"
        )
    k = _checks.check_int(k, "k", low=1)
    if init_sample_size is not None:
        init_sample_size = _checks.check_int(init_sample_size, "init_sample_size", low=k)
    chunk_size = _checks.check_int(chunk_size, "chunk_size", low=1)
    max_iter = _checks.check_int(max_iter, "max_iter", low=0)
    tol = _checks.check_nonnegative_float(tol, "tol")
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    if isinstance(init, str):
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS} or an array of shape (k, d), got {init!r}")
        target = init_sample_size or default_init_sample_size(np.iinfo(np.int64).max, k)  # n unknown yet
        sample, n = _reservoir(data, chunk_size, target, rng)
        _checks.check_num_codes(k, n)
        ones = jnp.ones((sample.shape[0],), jnp.float32)
        centroids = initial_centroids(key, jnp.asarray(sample), ones, k, init, sample.shape[0])
    else:
        centroids = _checks.check_float_array(init, "init", ndim=2).astype(jnp.float32)
        if centroids.shape[0] != k:
            raise ValueError(f"init must have k={k} rows, got shape {centroids.shape}")
    d = centroids.shape[1]
    if hasattr(data, "shape") and tuple(data.shape[1:]) != (d,):
        raise ValueError(f"data has shape {tuple(data.shape)} but init has d={d}; pass (n, {d}) data or matching init")
    num_far = min(k, chunk_size)
    n_chunks = -(-data.shape[0] // chunk_size) if hasattr(data, "shape") else None
    history = np.full((max_iter + 1,), np.nan, np.float32)
    seen = jnp.zeros((k,), jnp.float32)
    reseeded = 0
    t, rows = 0, 0
    while True:
        total = None
        desc = f"k-means pass {t + 1}/{max_iter + 1}"
        for chunk in progress(_chunks(data, chunk_size), total=n_chunks, desc=desc, enabled=verbose):
            p = _chunk_stats(*_padded(chunk, chunk_size, d), centroids, num_far=num_far, impl=impl)
            rows += len(chunk) if t == 0 else 0
            if minibatch and t < max_iter:
                centroids, seen, num_reseeded = _minibatch_step(centroids, seen, p)
                reseeded += int(num_reseeded)
            total = p if total is None else merge_stats(total, p)
        if total is None:
            raise ValueError("data yielded no chunks; pass a non-empty array or iterable")
        _checks.check_num_codes(k, rows)
        history[t] = float(total.inertia)
        converged = t > 0 and history[t - 1] - history[t] < tol * history[t - 1]
        if t >= max_iter or converged or history[t] <= 0:
            break
        if not minibatch:
            centroids, num_reseeded = update_centroids(centroids, total)
            reseeded += int(num_reseeded)
        t += 1
    stats = KMeansStats(inertia=jnp.asarray(history), num_iters=jnp.int32(t), num_reseeded=jnp.int32(reseeded))
    return KMeansCodebook(centroids=centroids, stats=stats)
