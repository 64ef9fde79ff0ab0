"""GPTQ / LDLQ error feedback, shared by GPTVQ (1/2/4 columns at a time) and QuIP# (8 at a time).

The layer loss of a weight W (out, in) with input Hessian H = X^T X / N is
tr((W - Q) H (W - Q)^T). With U the upper Cholesky factor of H^-1 (H^-1 = U^T U), quantizing
columns left to right and, after each chunk P of d columns, moving its error onto the columns
not yet quantized,

    E_P = (W_P - Q_P) U_PP^-1,        W_{>P} -= E_P U_{P,>P},

is GPTQ (d = 1) and QuIP#'s block LDLQ (d = 8): each chunk's rounding error is compensated as
well as a linear update of the later columns can. The chunk quantizer sees U_PP^-1 too, so a
vector quantizer can pick the code of least loss increase ||(x - c) U_PP^-1||^2 (GPTVQ) or
ignore it (a lattice's nearest point, QuIP#). Columns are processed in groups (a codebook's
columns for GPTVQ, 128 for QuIP#); inside a group the update is immediate, the rest of W is
updated once per group ("lazy batch" updates).

References:
    Frantar et al., "GPTQ: accurate post-training quantization for generative pre-trained
    transformers", ICLR 2023 (arXiv 2210.17323).
    Chee et al., "QuIP: 2-bit quantization of large language models with guarantees" (LDLQ),
    NeurIPS 2023; Tseng et al., QuIP# (arXiv 2402.04396).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def prepare(w, hessian: np.ndarray, *, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Damped H (float64), W with dead input columns zeroed, and U = chol(H^-1) upper (float64).

    Dead columns (H_jj = 0: an input that is always 0) get H_jj = 1 so H is invertible; their
    weights never matter. Damping adds damp * mean(diag H) to the diagonal (GPTQ's 1%).
    """
    h = np.array(hessian, np.float64, copy=True)
    w = np.array(w, np.float32, copy=True)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    for attempt in range(6):  # add damping until H^-1 has a Cholesky factor in float64
        try:
            inv = np.linalg.inv(h)
            u = np.linalg.cholesky((inv + inv.T) / 2).T  # upper: inv = u^T u
            break
        except np.linalg.LinAlgError:
            h[np.diag_indices_from(h)] += (10.0**attempt) * damp * np.mean(np.diag(h))
    return h, w, u


@functools.partial(jax.jit, static_argnames=("quantize", "d"))
def quantize_group(w_group, u_group, qargs, *, quantize, d: int):
    """GPTQ inside one group of c columns, d at a time.

    Args:
        w_group: (out, c) current weights of the group.
        u_group: (c, c) the group's diagonal block of U.
        qargs: pytree of arrays passed to `quantize` (codebooks, scales, ...).
        quantize: quantize(x (out, d), a (d, d) = U_PP^-1, chunk index, qargs) -> (q (out, d), codes (out, ...)).
        d: columns per chunk (divides c).

    Returns:
        q (out, c) quantized weights, codes (c / d, out, ...) per chunk, e (out, c) scaled errors E_P.
    """
    out, c = w_group.shape

    def step(w, k):
        x = lax.dynamic_slice_in_dim(w, k * d, d, axis=1)
        ukk = lax.dynamic_slice(u_group, (k * d, k * d), (d, d))
        a = jax.scipy.linalg.solve_triangular(ukk, jnp.eye(d, dtype=ukk.dtype), lower=False)
        q, codes = quantize(x, a, k, qargs)
        e = jnp.dot(x - q, a, precision=lax.Precision.HIGHEST)
        row = lax.dynamic_slice_in_dim(u_group, k * d, d, axis=0)  # (d, c), zero left of the chunk
        w = w - jnp.dot(e, row, precision=lax.Precision.HIGHEST)
        return w, (q, codes, e)

    _, (q, codes, e) = lax.scan(step, w_group, jnp.arange(c // d))
    q = jnp.moveaxis(q, 0, 1).reshape(out, c)
    e = jnp.moveaxis(e, 0, 1).reshape(out, c)
    return q, codes, e


@jax.jit
def propagate(w_rest, e, u_block):
    """The lazy update of the columns after a group: W_rest -= E U_{group, rest}."""
    return w_rest - jnp.dot(e, u_block, precision=lax.Precision.HIGHEST)


def layer_loss(w, q, hessian) -> float:
    """tr((W - Q) H (W - Q)^T) in float64 (tests and diagnostics)."""
    diff = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.sum((diff @ np.asarray(hessian, np.float64)) * diff))
