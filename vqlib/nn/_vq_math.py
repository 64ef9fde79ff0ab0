"""Straight-through vector quantization (the VQ-VAE family), as pure functions on one batch.

A batch z (n, d) is coded by its nearest codebook rows, q_i = codebook[argmin_j ||z_i - c_j||^2]
(ties: lowest index, `vqlib.kernels.assign`), and the layer outputs q with a gradient that skips
the argmin:
- straight-through (VQ-VAE): out = z + sg(q - z), so dL/dz = dL/dout;
- rotation trick: out = sg(s R) z with R the rotation taking z / ||z|| to q / ||q|| (in the
  plane of the two) and s = ||q|| / ||z||, so dL/dz = s R^T dL/dout: the gradient is turned
  with the vector, which keeps the angle between z and q (sg: stop_gradient).
Losses, means over the elements: commitment ||z - sg(q)||^2 (pulls the encoder to its code) and
codebook ||sg(z) - q||^2 (pulls a gradient-learned codebook to the encoder's outputs).

EMA codebook (`EMACodebook`): counts_j <- decay counts_j + (1 - decay) n_j and
sums_j <- decay sums_j + (1 - decay) sum_{i: code j} z_i; codebook_j = sums_j / counts_j. The
state starts at zero and `weight` (the EMA of 1, i.e. 1 - decay^t) debiases the counts, so
counts / weight is the average number of batch vectors a code receives. On a fixed data stream
the fixed point is a Lloyd fixed point: the k-means centroids. A code whose debiased count is 0
keeps its row. Dead codes: a code whose debiased count is below `threshold` is restarted from
the batch: the j-th dead code (in index order) moves to the batch vector with the j-th largest
quantization error, the rule `fit_kmeans` uses for empty clusters (deterministic, no PRNG key).

The linear reparameterisation (SimVQ) is codebook = basis @ projection, a frozen basis and a
learned (d, d) projection: `vqlib.nn.VectorQuantizer(codebook="linear")` builds it and passes the
product here.

References:
    van den Oord et al., "Neural Discrete Representation Learning", NeurIPS 2017 (arXiv 1711.00937).
    Razavi et al., "Generating Diverse High-Fidelity Images with VQ-VAE-2", NeurIPS 2019 (EMA).
    Fifty et al., "Restructuring Vector Quantization with the Rotation Trick", ICLR 2025
    (arXiv 2410.06424).
    Zhu et al., "Addressing Representation Collapse in Vector Quantized Models with One Linear
    Layer" (SimVQ), arXiv 2411.02038.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Int

from vqlib import _checks
from vqlib._types import pytree_dataclass
from vqlib.kernels import assign as assign_op

sg = lax.stop_gradient


@pytree_dataclass
class VQStats:
    """Statistics of one batch through a VQ layer.

    Attributes:
        loss: () codebook_loss + commitment_cost * commitment_loss, the term to add to the
            training objective (with an EMA codebook the codebook term carries no gradient).
        commitment_loss: () mean over the elements of (z - sg(q))^2.
        codebook_loss: () mean over the elements of (sg(z) - q)^2 (the same value; its gradient
            reaches the codebook).
        usage: (k,) float32, fraction of the batch's vectors coded by each code.
        perplexity: () exp of the entropy of `usage`: k when every code is used equally, 1 when
            one code takes the whole batch.
        num_restarted: () int32, dead codes restarted by this step.
    """

    loss: jax.Array
    commitment_loss: jax.Array
    codebook_loss: jax.Array
    usage: jax.Array
    perplexity: jax.Array
    num_restarted: jax.Array


@pytree_dataclass
class EMACodebook:
    """A codebook learned by exponential moving averages of its clusters' sums and sizes.

    Attributes:
        codebook: (k, d) float32, the current codes.
        counts: (k,) float32, EMA of the number of batch vectors coded by each code.
        sums: (k, d) float32, EMA of the sum of those vectors.
        weight: () float32, EMA of 1 (1 - decay^t after t updates); counts / weight is debiased.
    """

    codebook: jax.Array
    counts: jax.Array
    sums: jax.Array
    weight: jax.Array


def ema_init(codebook: Float[ArrayLike, "k d"]) -> EMACodebook:
    """An EMA state that has seen no data: the given codes, zero counts, sums and weight.

    Example:
        >>> import jax.numpy as jnp, vqlib
        >>> vqlib.nn.ema_init(jnp.zeros((4, 2))).counts.tolist()
        [0.0, 0.0, 0.0, 0.0]
    """
    codebook = _checks.check_float_array(codebook, "codebook", ndim=2).astype(jnp.float32)
    k = codebook.shape[0]
    return EMACodebook(codebook, jnp.zeros((k,), jnp.float32), jnp.zeros_like(codebook), jnp.zeros((), jnp.float32))


def _rotate_onto(z, q):
    """s R z for each row (the rotation trick); q carries no gradient. Rows with z = 0 are reflected
    instead (e = 0, r = q / ||q||); the caller's sg correction still makes the forward value q."""
    z_norm = jnp.linalg.norm(z, axis=1, keepdims=True)
    q_norm = jnp.linalg.norm(q, axis=1, keepdims=True)
    e = sg(z / jnp.where(z_norm > 0, z_norm, 1.0))
    q_hat = q / jnp.where(q_norm > 0, q_norm, 1.0)
    r = e + q_hat
    r = r / jnp.maximum(jnp.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    scale = sg(jnp.where(z_norm > 0, q_norm / jnp.where(z_norm > 0, z_norm, 1.0), 1.0))
    rz = jnp.sum(r * z, axis=1, keepdims=True)
    ez = jnp.sum(e * z, axis=1, keepdims=True)
    return scale * (z - 2.0 * rz * r + 2.0 * ez * q_hat)


def _usage(codes, k: int):
    usage = jnp.zeros((k,), jnp.float32).at[codes].add(1.0) / codes.shape[0]
    entropy = -jnp.sum(jnp.where(usage > 0, usage * jnp.log(jnp.where(usage > 0, usage, 1.0)), 0.0))
    return usage, jnp.exp(entropy)


def vector_quantize(
    z: Float[ArrayLike, "*b d"],
    codebook: Float[ArrayLike, "k d"],
    *,
    commitment_cost: float = 0.25,
    rotation_trick: bool = False,
):
    """Nearest-code quantization with a gradient past the argmin, its losses and usage statistics.

    Args:
        z: (n, d) vectors (encoder outputs), float32.
        codebook: (k, d) codes; gradients reach it through `codebook_loss` only (pass
            `stop_gradient(codebook)`, or an `EMACodebook`'s rows, when it is not trained by gradient).
        commitment_cost: weight of the commitment loss in `stats.loss` (VQ-VAE's beta), >= 0.
        rotation_trick: pass gradients by the rotation trick instead of straight through.

    Returns:
        out: (n, d) the codes q in the forward pass, with a straight-through (or rotated)
            gradient to z.
        codes: (n,) int32 code indices.
        stats: `VQStats` (num_restarted is 0 here; `restart_dead_codes` counts restarts).

    Example:
        >>> import jax.numpy as jnp, vqlib
        >>> z = jnp.array([[0.9, 0.1], [0.0, 2.2]])
        >>> out, codes, stats = vqlib.nn.vector_quantize(z, jnp.array([[1.0, 0.0], [0.0, 2.0]]))
        >>> codes.tolist(), out.tolist(), round(float(stats.commitment_loss), 4)
        ([0, 1], [[1.0, 0.0], [0.0, 2.0]], 0.015)
    """
    z = _checks.check_float_array(z, "z", ndim=2)
    codebook = _checks.check_float_array(codebook, "codebook", ndim=2)
    _checks.check_dim(codebook, z.shape[1], "codebook", what="z has")
    commitment_cost = _checks.check_nonnegative_float(commitment_cost, "commitment_cost")
    return _vector_quantize(z, codebook, commitment_cost, rotation_trick=bool(rotation_trick))


@functools.partial(jax.jit, static_argnames=("rotation_trick",))
def _vector_quantize(z, codebook, commitment_cost, *, rotation_trick: bool):
    codebook = codebook.astype(z.dtype)
    codes, _ = assign_op(sg(z), sg(codebook))
    q = jnp.take(codebook, codes, axis=0)
    if rotation_trick:
        rotated = _rotate_onto(z, sg(q))
        out = rotated + sg(q - rotated)
    else:
        out = z + sg(q - z)
    commitment = jnp.mean(jnp.square(z - sg(q)))
    codebook_loss = jnp.mean(jnp.square(sg(z) - q))
    usage, perplexity = _usage(codes, codebook.shape[0])
    stats = VQStats(
        loss=codebook_loss + commitment_cost * commitment,
        commitment_loss=commitment,
        codebook_loss=codebook_loss,
        usage=usage,
        perplexity=perplexity,
        num_restarted=jnp.zeros((), jnp.int32),
    )
    return out, codes, stats


def ema_update(
    state: EMACodebook, z: Float[ArrayLike, "*b d"], codes: Int[ArrayLike, "*b"], *, decay: float = 0.99
) -> EMACodebook:
    """One EMA step of the codebook on a batch and its codes (from `vector_quantize`).

    Args:
        state: the current `EMACodebook`.
        z: (n, d) the batch (no gradient flows into the state).
        codes: (n,) int32 codes of z under `state.codebook`.
        decay: EMA decay in [0, 1); 0 replaces each used code by its batch mean (a Lloyd step).

    Returns:
        The updated `EMACodebook`; a code no vector has reached yet keeps its row.

    Example:
        >>> import jax.numpy as jnp, vqlib
        >>> state = vqlib.nn.ema_init(jnp.array([[0.0], [5.0]]))
        >>> z = jnp.array([[1.0], [2.0], [6.0]])
        >>> vqlib.nn.ema_update(state, z, jnp.array([0, 0, 1])).codebook.ravel().tolist()
        [1.5, 6.0]
    """
    z = _checks.check_float_array(z, "z", ndim=2)
    _checks.check_dim(z, state.codebook.shape[1], "z", what="the codebook has")
    codes = _checks.check_codes(codes, state.codebook.shape[0])
    if codes.shape != z.shape[:1]:
        raise ValueError(f"codes must have shape {z.shape[:1]} (one code per row of z), got {codes.shape}")
    if not _checks.check_nonnegative_float(decay, "decay") < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay!r}; 0.99 is the usual value")
    return _ema_update(state, z, codes, decay)


@jax.jit
def _ema_update(state: EMACodebook, z, codes, decay):
    k = state.codebook.shape[0]
    z = sg(z).astype(jnp.float32)
    batch_counts = jax.ops.segment_sum(jnp.ones(codes.shape, jnp.float32), codes, k)
    batch_sums = jax.ops.segment_sum(z, codes, k)
    counts = decay * state.counts + (1.0 - decay) * batch_counts
    sums = decay * state.sums + (1.0 - decay) * batch_sums
    reached = counts > 0
    codebook = jnp.where(reached[:, None], sums / jnp.where(reached, counts, 1.0)[:, None], state.codebook)
    return EMACodebook(codebook, counts, sums, decay * state.weight + (1.0 - decay))


def restart_dead_codes(
    state: EMACodebook, z: Float[ArrayLike, "*b d"], *, threshold: float
) -> tuple[EMACodebook, Int[Array, ""]]:
    """Moves codes used by fewer than `threshold` batch vectors on average to badly coded batch vectors.

    A code is dead when counts / weight < threshold. The j-th dead code (index order) takes the
    batch vector with the j-th largest squared distance to its nearest code, when that distance
    is > 0 and j < n; its count restarts at `threshold` and its sum at `threshold` times the
    vector, so it is not dead again until its EMA count decays.

    Args:
        state: an `EMACodebook` after `ema_update` (weight > 0).
        z: (n, d) the batch.
        threshold: dead-code threshold >= 0, in vectors per batch (0 restarts nothing).

    Returns:
        The new state and the number of codes restarted (() int32).

    Example:
        >>> import jax.numpy as jnp, vqlib
        >>> state = vqlib.nn.ema_init(jnp.array([[0.0], [100.0]]))
        >>> z = jnp.array([[0.0], [1.0], [3.0]])
        >>> state = vqlib.nn.ema_update(state, z, jnp.array([0, 0, 0]))
        >>> state, num = vqlib.nn.restart_dead_codes(state, z, threshold=0.5)
        >>> state.codebook.ravel().tolist(), int(num)
        ([1.3333333730697632, 3.0], 1)
    """
    z = _checks.check_float_array(z, "z", ndim=2)
    _checks.check_dim(z, state.codebook.shape[1], "z", what="the codebook has")
    threshold = _checks.check_nonnegative_float(threshold, "threshold")
    return _restart_dead_codes(state, z, threshold)


@jax.jit
def _restart_dead_codes(state: EMACodebook, z, threshold):
    k = state.codebook.shape[0]
    z = sg(z).astype(jnp.float32)
    _, errors = assign_op(z, state.codebook)
    num_far = min(k, z.shape[0])
    far_errors, far = lax.top_k(errors, num_far)
    dead = state.counts < threshold * state.weight
    rank = jnp.cumsum(dead) - 1
    slot = jnp.clip(rank, 0, num_far - 1)
    restart = dead & (rank < num_far) & (far_errors[slot] > 0)
    vectors = z[far[slot]]
    count = threshold * state.weight
    state = EMACodebook(
        codebook=jnp.where(restart[:, None], vectors, state.codebook),
        counts=jnp.where(restart, count, state.counts),
        sums=jnp.where(restart[:, None], count * vectors, state.sums),
        weight=state.weight,
    )
    return state, jnp.sum(restart, dtype=jnp.int32)
