"""Training samples: fits that need at most so many points per centroid draw them uniformly."""

from __future__ import annotations

import functools

import jax

from vqlib import _checks


def training_sample(key, x, w, k: int, max_points_per_centroid: int | None):
    """At most k * max_points_per_centroid rows of x (and of their weights w, or None), drawn
    uniformly without replacement; all of x when None or when x is smaller."""
    if max_points_per_centroid is None:
        return x, w
    size = k * _checks.check_int(max_points_per_centroid, "max_points_per_centroid", low=1)
    if x.shape[0] <= size:
        return x, w
    return _sample(key, x, w, size)


@functools.partial(jax.jit, static_argnames="size")
def _sample(key, x, w, size: int):
    """`size` rows of x (and w) without replacement, as one program."""
    rows = jax.random.choice(key, x.shape[0], (size,), replace=False)
    return x[rows], None if w is None else w[rows]
