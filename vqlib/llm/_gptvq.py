"""GPTVQ: GPTQ's error feedback with vector codebooks of 1, 2 or 4 dimensions.

W (out, in) is quantized `vector_dim` (d) columns at a time, left to right, by the GPTQ loop of
`_gptq.py`. Columns are grouped (`group_cols` columns, all rows): when the loop enters a group,
the group's codebook of K = 2**(bits * d) centroids is fitted to the group's *updated* weights
(so it sees the error fed forward from the groups before) by weighted k-means
(`vqlib.fit(..., "kmeans", sample_weight=)`); the points are the d-column pieces of every row,
each weighted by the mean of 1 / U_jj^2 over its columns (the GPTQ-consistent weight of the
loss increase, U = chol(H^-1)). Inside the group a piece x gets the centroid of least loss
increase ||(x - c) U_PP^-1||^2 (the full d x d block, not only its diagonal). Optionally each
row is first divided by its RMS (a float16 row scale; the k-means weight carries the square of
it). After the whole matrix, the codebooks are refined with codes fixed by `update_steps` Adam
steps on tr((W - Q) H (W - Q)^T) (GPTVQ's codebook update).

Stored: codes of bits * d bits per d weights, one float16 codebook (K, d) per group of columns
(bits per weight: bits + K * d * 16 / (out * group_cols)), float16 row scales.

References:
    van Baalen et al., "GPTVQ: the blessing of dimensionality for LLM quantization"
    (arXiv 2402.15319).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from vqlib import _checks
from vqlib.llm import _finetune
from vqlib.llm._common import check_known, fit_centroids
from vqlib.llm._gptq import prepare, propagate, quantize_group
from vqlib.llm._weights import CompressedWeight, coded_part

NEEDS_CALIBRATION = True
VECTOR_DIMS = (1, 2, 4)
# bits -> default vector dimension: 2 bits as 4-dim codebooks of 256 entries, 3 and 4 bits as
# 2-dim codebooks of 64 and 256 entries (GPTVQ's best rows at these rates).
DEFAULT_DIM = {1: 4, 2: 4, 3: 2, 4: 2}
# Target columns per codebook by vector dimension (the nearest divisor of `in` is used).
DEFAULT_GROUP_COLS = {1: 128, 2: 128, 4: 256}
OPTIONS = (
    "vector_dim",
    "group_cols",
    "kmeans_iters",
    "points_per_centroid",
    "update_steps",
    "row_scale",
    "damp",
    *_finetune.OPTIONS,
)


def check_options(bits, options: dict) -> dict:
    bits = _checks.check_int(bits, "bits", low=1, high=8)
    check_known(options, OPTIONS, "gptvq")
    d = options.get("vector_dim", DEFAULT_DIM.get(bits, 1))
    if d not in VECTOR_DIMS:
        raise ValueError(f"vector_dim must be one of {VECTOR_DIMS}, got {d!r}")
    if bits * d > 16:
        raise ValueError(
            f"bits={bits} with vector_dim={d} needs codebooks of 2**{bits * d} entries (codes of {bits * d} bits); "
            "codes are at most 16 bits: use bits * vector_dim <= 16"
        )
    group = options.get("group_cols")
    if group is not None:
        group = _checks.check_int(group, "group_cols", low=d)
    return dict(
        bits=bits,
        vector_dim=d,
        group_cols=group,
        kmeans_iters=_checks.check_int(options.get("kmeans_iters", 20), "kmeans_iters", low=1),
        points_per_centroid=_checks.check_int(options.get("points_per_centroid", 64), "points_per_centroid", low=1),
        update_steps=_checks.check_int(options.get("update_steps", 25), "update_steps", low=0),
        row_scale=_checks.check_bool(options.get("row_scale", True), "row_scale"),
        damp=_checks.check_nonnegative_float(options.get("damp", 0.01), "damp"),
        **_finetune.check_options(options),
    )


def group_columns(n_in: int, d: int, target: int | None) -> int:
    """The divisor of n_in that is a multiple of d and nearest to `target` (the larger on ties)."""
    target = target or DEFAULT_GROUP_COLS[d]
    divisors = [c for c in range(d, n_in + 1, d) if n_in % c == 0]
    return min(divisors, key=lambda c: (abs(c - target), -c))


def check_shape(name: str, shape, *, bits: int, vector_dim: int, group_cols, **_) -> None:
    out, n_in = shape
    if n_in % vector_dim:
        raise ValueError(f"{name} has {n_in} input columns, not a multiple of vector_dim={vector_dim}")
    if group_cols is not None and n_in % group_cols:
        raise ValueError(f"{name} has {n_in} input columns, not a multiple of group_cols={group_cols}")
    c = group_columns(n_in, vector_dim, group_cols)
    points, k = out * c // vector_dim, 2 ** (bits * vector_dim)
    if points < k:
        raise ValueError(
            f"{name}: a group of {c} columns holds {points} vectors, fewer than the {k} centroids of "
            f"bits={bits}, vector_dim={vector_dim}; use larger group_cols or a smaller vector_dim"
        )


def _nearest(x, a, codebook):
    """Codes (out,) of least ||(x - c) a||^2, x (out, d), codebook (k, d)."""
    xa = jnp.dot(x, a, precision=lax.Precision.HIGHEST)
    ca = jnp.dot(codebook, a, precision=lax.Precision.HIGHEST)
    d2 = jnp.sum(ca * ca, -1)[None, :] - 2 * jnp.dot(xa, ca.T, precision=lax.Precision.HIGHEST)
    return jnp.argmin(d2, axis=-1).astype(jnp.int32)


def _vq_chunk(x, a, k, qargs):
    codebook, scales = qargs
    codes = _nearest(x / scales[:, None], a, codebook)
    return scales[:, None] * codebook[codes], codes


@functools.partial(jax.jit, static_argnames=("d",))
def _decode(codebooks, codes, scales, *, d: int):
    """codebooks (g, k, d), codes (out, in / d), scales (out,) -> (out, in)."""
    out, pieces = codes.shape
    group = jnp.arange(pieces) // (pieces // codebooks.shape[0])
    return (codebooks[group[None, :], codes] * scales[:, None, None]).reshape(out, pieces * d)


@functools.partial(jax.jit, static_argnames=("d", "steps"))
def _update_codebooks(codebooks, codes, scales, w, hessian, *, d: int, steps: int):
    """Adam on the codebooks, codes fixed, minimizing tr((W - Q) H (W - Q)^T); returns the best seen."""
    norm = jnp.sum((w @ hessian) * w) + 1e-30

    def loss(cb):
        diff = w - _decode(cb, codes, scales, d=d)
        return jnp.sum(jnp.dot(diff, hessian, precision=lax.Precision.HIGHEST) * diff) / norm

    opt = optax.adam(1e-3 * jnp.sqrt(jnp.mean(codebooks**2)))

    def step(carry, _):
        cb, state, best, best_loss = carry
        value, grad = jax.value_and_grad(loss)(cb)
        better = value < best_loss
        best = jnp.where(better, cb, best)
        best_loss = jnp.where(better, value, best_loss)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 step counts
            updates, state = opt.update(grad, state, cb)
        return (optax.apply_updates(cb, updates), state, best, best_loss), None

    init = (codebooks, opt.init(codebooks), codebooks, loss(codebooks))
    (cb, _, best, best_loss), _ = lax.scan(step, init, None, length=steps)
    return jnp.where(loss(cb) < best_loss, cb, best)


def compress_weight(
    key,
    w,
    hessian,
    *,
    bits: int,
    vector_dim: int,
    group_cols,
    kmeans_iters: int,
    points_per_centroid: int,
    update_steps: int,
    row_scale: bool,
    damp: float,
    embedding: bool = False,
    **_,
) -> CompressedWeight:
    """GPTVQ of one (out, in) weight given its input Hessian (None: identity)."""
    del embedding  # no rotation: rows can be decoded one at a time as they are
    out, n_in = w.shape
    d = vector_dim
    k = 2 ** (bits * d)
    h, w0, u = prepare(w, np.eye(n_in) if hessian is None else hessian, damp=damp)
    if row_scale:
        scales = np.sqrt(np.mean(w0.astype(np.float64) ** 2, axis=1)) + 1e-12
    else:
        scales = np.ones(out)
    scales = jnp.asarray(scales.astype(np.float16).astype(np.float32))
    c = group_columns(n_in, d, group_cols)
    col_weight = 1.0 / np.diag(u) ** 2
    uj = jnp.asarray(u, jnp.float32)
    wj = jnp.asarray(w0)
    codebooks, codes = [], []
    for g in range(n_in // c):
        cols = slice(g * c, (g + 1) * c)
        points = (wj[:, cols] / scales[:, None]).reshape(-1, d)  # (out * c / d, d), row-major
        piece_weight = col_weight[cols].reshape(-1, d).mean(axis=1)  # (c / d,)
        weights = (np.asarray(scales, np.float64)[:, None] ** 2 * piece_weight[None, :]).reshape(-1)
        weights = jnp.asarray(weights / weights.mean(), jnp.float32)
        cb = fit_centroids(
            jax.random.fold_in(key, g), points, weights, k, kmeans_iters, points_per_centroid, keep_heaviest=True
        )
        centroids = cb.centroids.astype(jnp.float16).astype(jnp.float32)
        _, group_codes, e = quantize_group(wj[:, cols], uj[cols, cols], (centroids, scales), quantize=_vq_chunk, d=d)
        if (g + 1) * c < n_in:
            wj = wj.at[:, (g + 1) * c :].set(propagate(wj[:, (g + 1) * c :], e, uj[cols, (g + 1) * c :]))
        codebooks.append(centroids)
        codes.append(jnp.moveaxis(group_codes, 0, 1))  # (out, c / d)
    codebooks = jnp.stack(codebooks)  # (groups, k, d)
    codes = jnp.concatenate(codes, axis=1)  # (out, in / d)
    if update_steps:
        hj = jnp.asarray(h, jnp.float32)
        codebooks = _update_codebooks(codebooks, codes, scales, jnp.asarray(w0), hj, d=d, steps=update_steps)
    stored = codebooks[:, :, 0] if d == 1 else codebooks
    part = coded_part("scalar" if d == 1 else "vq", codes[None], stored, scales, bits=bits * d, group=c, shape=w.shape)
    return CompressedWeight((part,))
