"""Helpers shared by the compressors: the check of their option names, and the weighted k-means call
(the one place its options are spelled)."""

from __future__ import annotations

import jax

from vqlib.codebooks import fit


def check_known(options: dict, known: tuple[str, ...], method: str) -> None:
    """TypeError naming the options a compressor does not take, and the ones it does."""
    unknown = set(options) - set(known)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)} for method {method!r}; it takes {list(known)}")


def fit_centroids(key, points, weights, k: int, iters: int, per_centroid: int):
    """A weighted k-means codebook (`.centroids` (k, d)) by `vqlib.fit(..., "kmeans", sample_weight=)`, fitted to a
    uniform sample of at most max(per_centroid * k, 8192) of the points (weights kept).

    vqlib's Lloyd iterations cost about 2 us per point on a 2-core CPU at d = 4, k = 256, so the
    sample bounds a fit at a fraction of a second; 64 points per centroid is plenty for k-means.
    """
    sample_key, fit_key = jax.random.split(key)
    limit = max(per_centroid * k, 8192)
    if points.shape[0] > limit:
        pick = jax.random.choice(sample_key, points.shape[0], (limit,), replace=False)
        points = points[pick]
        weights = None if weights is None else weights[pick]
    return fit(points, "kmeans", key=fit_key, k=k, max_iter=iters, sample_weight=weights)
