"""Shared by the Pallas assign kernels: dtype rules, padding, the running (min, argmin) update."""

from __future__ import annotations

import jax
import jax.numpy as jnp

FAR = float(jnp.finfo(jnp.float32).max)  # the norm of a padding centroid: it never wins
_DOT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def dot_dtype(x: jax.Array, centroids: jax.Array, backend: str):
    """The dtype the dot runs in: 16-bit when both inputs share it, else float32; float64 is refused."""
    for a, name in ((x, "x"), (centroids, "centroids")):
        if a.dtype not in _DOT_DTYPES:
            raise NotImplementedError(
                f"{backend} assign takes float32, bfloat16 or float16 {name}, got {a.dtype}; use impl='xla'"
            )
    return x.dtype if x.dtype != jnp.float32 and centroids.dtype == x.dtype else jnp.float32


def next_pow2(v: int, low: int = 1) -> int:
    return max(low, 1 << (max(v, 1) - 1).bit_length())


def pad_to(a: jax.Array, shape: tuple[int, ...], value=0.0) -> jax.Array:
    """Pads `a` at the end of each axis up to `shape` (no copy when nothing is missing)."""
    widths = [(0, s - n) for n, s in zip(a.shape, shape, strict=True)]
    return a if all(w == 0 for _, w in widths) else jnp.pad(a, widths, constant_values=value)


def centroid_norms(c: jax.Array, kp: int) -> jax.Array:
    """||c||^2 in float32 of the (k, d) centroids (in the dot dtype), padded to kp with FAR; once per call."""
    c32 = c.astype(jnp.float32)
    return pad_to(jnp.sum(c32 * c32, axis=1), (kp,), FAR)


def merge(best, arg, tile_best, tile_arg):
    """Running minimum across tiles: a later tile wins only when strictly smaller (lowest index on ties)."""
    better = tile_best < best
    return jnp.where(better, tile_best, best), jnp.where(better, tile_arg, arg)
