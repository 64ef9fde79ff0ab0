"""Differentiable k-means (DKM): k-means as attention, differentiable through its iterations.

For weights w (n, d) and centroids c (k, d), one DKM iteration is

    A[i, j] = softmax_j(-||w_i - c_j||^2 / tau)            attention, (n, k)
    c_j    <- sum_i A[i, j] w_i / sum_i A[i, j]             attention-weighted mean

A centroid whose attention mass sum_i A[i, j] is below the float epsilon (no point attends to
it) keeps its place. After `max_iter` iterations the output is the soft reconstruction
w_soft = A(c_T) c_T, and gradients flow back through every iteration to w and to the initial
centroids (wrap them in `jax.lax.stop_gradient` to train w alone). As tau -> 0 the attention
becomes the nearest-centroid one-hot (ties split evenly), each iteration a Lloyd step, and w_soft
the hard k-means reconstruction. The iteration count is fixed (coremltools uses 3): an early stop
on the change of the centroids would make the backward pass depend on the data.

Memory. Autodiff through the plain formulas keeps every (n, k) attention map and its logits
for the backward pass: for a 4096 x 4096 weight and k = 16 that is 1 GiB per map in float32,
max_iter + 1 maps and as many intermediates. Here every pass over w runs in tiles of
`block_n` rows (a `lax.scan`), under a custom VJP that saves only its inputs (w and the (k, d)
centroids) and recomputes each tile's attention in the backward pass. Beyond a few copies of w
(the input, the padded tiles, the output and their cotangents), the scratch is a handful of
(block_n, k) tiles, 1 MiB each by default. Measured (`benchmarks/dkm_digits.py`, 2-core CPU):
value and gradient for a 4096 x 4096 float32 weight, k = 16, max_iter = 3, peak at 0.88 GB RSS
for the whole process, 0.50 GB above its RSS with w loaded (w is 64 MiB; 9-10 s per call). Autodiff
through the plain formulas already grows by 2.5 GB at 2048 x 2048 (tiled: 0.16 GB) and would need
about 10 GB at 4096 x 4096. `tests/codebooks/test_dkm.py::test_peak_memory_2048_squared` asserts
the growth at 2048 x 2048 stays under two attention maps (0.5 GiB).

References:
    Cho et al., "DKM: Differentiable k-Means Clustering Layer for Neural Network Compression",
    ICLR 2022 (arXiv 2108.12659).
    Cho et al., "eDKM: An Efficient and Accurate Train-time Weight Clustering for Large Language
    Models", arXiv 2309.00964 (memory of the attention maps).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import ArrayLike, Float

from vqlib import _checks

# Elements of one (block_n, k) attention tile: 1 MiB in float32 (measured fastest on CPU: 16,384 rows at k = 16).
TILE_ELEMENTS = 2**18


def _compute_dtype(w, centroids):
    """float64 when either input is float64 (jax_enable_x64 on), else float32."""
    return jnp.float64 if jnp.float64 in (w.dtype, centroids.dtype) else jnp.float32


def _attention(wb, centroids, tau):
    """(bn, d) rows, (k, d) centroids -> (bn, k) softmax over the centroids of -||w - c||^2 / tau.

    The logits are (2 w.c - ||c||^2) / tau: the ||w||^2 / tau term is the same for every centroid
    and cancels in the softmax. One small matrix product instead of a (bn, k, d) difference tensor
    (7x faster on CPU for d = 1).
    """
    logits = jnp.dot(wb, (2.0 / tau) * centroids.T, precision=lax.Precision.HIGHEST)
    return jax.nn.softmax(logits - (jnp.sum(centroids * centroids, axis=1) / tau)[None, :], axis=1)


def _stats_tile(n: int, i, wb, centroids, tau):
    """One tile's share of (A^T w (k, d), A^T 1 (k,)); rows past n (padding) are masked out."""
    rows = i * wb.shape[0] + jnp.arange(wb.shape[0])
    a = jnp.where((rows < n)[:, None], _attention(wb, centroids, tau), 0.0)
    return None, (jnp.dot(a.T, wb, precision=lax.Precision.HIGHEST), jnp.sum(a, axis=0))


def _soft_tile(i, wb, centroids, tau):
    """One tile of the soft reconstruction A c, (bn, d)."""
    return jnp.dot(_attention(wb, centroids, tau), centroids, precision=lax.Precision.HIGHEST), None


def _scan_tiles(tile_fn, w_tiles, centroids, tau):
    """Runs tile_fn(i, tile, centroids, tau) -> (per-tile output, summand) over the tiles of w;
    returns the stacked per-tile outputs and the sum of the summands (either may be None)."""
    _, summand = jax.eval_shape(functools.partial(tile_fn, 0), w_tiles[0], centroids, tau)
    total = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), summand)

    def step(total, xs):
        i, wb = xs
        out, part = tile_fn(i, wb, centroids, tau)
        return jax.tree.map(jnp.add, total, part), out

    total, outs = lax.scan(step, total, (jnp.arange(w_tiles.shape[0]), w_tiles))
    return outs, total


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _over_tiles(tile_fn, w_tiles, centroids, tau):
    return _scan_tiles(tile_fn, w_tiles, centroids, tau)


def _over_tiles_fwd(tile_fn, w_tiles, centroids, tau):
    return _scan_tiles(tile_fn, w_tiles, centroids, tau), (w_tiles, centroids, tau)


def _over_tiles_bwd(tile_fn, residuals, cotangents):
    """Recomputes each tile's attention and pulls the cotangents back through it: O(tile) scratch."""
    w_tiles, centroids, tau = residuals
    d_outs, d_total = cotangents

    def step(d_centroids, xs):
        i, wb, d_out = xs
        _, pullback = jax.vjp(lambda wb, c: tile_fn(i, wb, c, tau), wb, centroids)
        d_wb, d_c = pullback((d_out, d_total))
        return d_centroids + d_c, d_wb

    xs = (jnp.arange(w_tiles.shape[0]), w_tiles, d_outs)
    d_centroids, d_tiles = lax.scan(step, jnp.zeros_like(centroids), xs)
    return d_tiles, d_centroids, jnp.zeros_like(tau)


_over_tiles.defvjp(_over_tiles_fwd, _over_tiles_bwd)


@functools.partial(jax.jit, static_argnames=("max_iter", "block_n"))
def _dkm(w, centroids, tau, *, max_iter: int, block_n: int):
    n, d = w.shape
    dtype = _compute_dtype(w, centroids)
    c = centroids.astype(dtype)
    tau = jnp.asarray(tau).astype(dtype)
    num_tiles = -(-n // block_n)
    tiles = jnp.pad(w.astype(dtype), ((0, num_tiles * block_n - n), (0, 0))).reshape(num_tiles, block_n, d)
    min_mass = jnp.finfo(dtype).eps
    for _ in range(max_iter):  # unrolled: the tiles are saved once for all passes, not per iteration
        _, (sums, mass) = _over_tiles(functools.partial(_stats_tile, n), tiles, c, tau)
        kept = mass > min_mass
        c = jnp.where(kept[:, None], sums / jnp.where(kept, mass, 1.0)[:, None], c)
    soft, _ = _over_tiles(_soft_tile, tiles, c, tau)
    return soft.reshape(num_tiles * block_n, d)[:n].astype(w.dtype), c.astype(centroids.dtype)


def default_block_n(n: int, k: int, d: int) -> int:
    """Rows per tile: the (block_n, k) attention and the (block_n, d) rows hold about TILE_ELEMENTS
    elements each, and a tile has no more rows than w."""
    return max(1, min(n, TILE_ELEMENTS // max(k, d)))


def dkm(
    w: Float[ArrayLike, "n d"],
    centroids: Float[ArrayLike, "k d"],
    *,
    tau,
    max_iter: int = 3,
    block_n: int | None = None,
):
    """Differentiable k-means: `max_iter` attention-weighted centroid updates, then w's soft reconstruction.

    Args:
        w: (n, d) weights to cluster (rows are the clustered vectors; d = 1 for scalar
            palettisation), any float dtype; computed in float32 (float64 for float64 inputs).
        centroids: (k, d) starting centroids, k <= n, e.g. `fit_kmeans(key, w, k=k).centroids`
            or the previous training step's output.
        tau: softmax temperature > 0, in the units of the squared distance (scale it with the
            variance of w); a traced scalar is accepted, so a schedule does not recompile.
        max_iter: centroid updates per call (0 returns the reconstruction from `centroids`).
        block_n: rows per tile; default `default_block_n(n, k, d)` (tiles of about 1 MiB).

    Returns:
        w_soft: (n, d) in w's dtype, the attention-weighted reconstruction A(c_T) c_T.
        centroids: (k, d) the updated centroids c_T, in the dtype of `centroids`.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, vqlib
        >>> w = jnp.array([[0.0], [0.1], [0.9], [1.0]])
        >>> w_soft, c = vqlib.codebooks.dkm(w, jnp.array([[0.2], [0.7]]), tau=1e-3)
        >>> show = lambda a: np.asarray(a, np.float64).round(3).ravel().tolist()
        >>> show(c), show(w_soft)
        ([0.05, 0.95], [0.05, 0.05, 0.95, 0.95])
        >>> g = jax.grad(lambda w: vqlib.codebooks.dkm(w, c, tau=0.1)[0].sum())(w)   # flows to w
        >>> g.shape
        (4, 1)
    """
    w = _checks.check_float_array(w, "w", ndim=2)
    centroids = _checks.check_float_array(centroids, "centroids", ndim=2)
    n, d = w.shape
    _checks.check_dim(centroids, d, "centroids", what="w has")
    k = centroids.shape[0]
    if not 1 <= k <= n:
        raise ValueError(
            f"centroids has k={k} rows but w has n={n} rows (weights to cluster); use 1 <= k <= {n}: "
            "fewer centroids (bits) or a larger tensor"
        )
    tau = _checks.check_tau(tau)
    max_iter = _checks.check_int(max_iter, "max_iter", low=0)
    block_n = default_block_n(n, k, d) if block_n is None else _checks.check_int(block_n, "block_n", low=1)
    return _dkm(w, centroids, tau, max_iter=max_iter, block_n=block_n)
