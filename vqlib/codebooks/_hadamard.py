"""Random orthogonal transforms of the last axis: the randomized Hadamard transform and Haar rotations.

Quantizers that assume incoherent coordinates (TurboQuant, QuIP#'s E8P) rotate first. Both kinds
here are one `Rotation` pytree, the map

    y = (F kron H_P) diag(s) x,        d = K * P,  P = 2**k the largest power of two dividing d,

with s a random sign vector, H_P the orthonormal Walsh-Hadamard matrix (applied by the fast
transform, O(d log d), never built) and F a K x K orthogonal Kronecker factor:

- kind="hadamard": F is Haar-random on the odd part K of d (F = [[1]] when d is a power of two),
  so y costs O(d log P + d K). QuIP# uses a Hadamard matrix of order K for F
  (K in {12, 20, 28, ...}); a Haar factor is orthogonal for every K and mixes at least as well.
  For a d with a large odd part (a prime d is K = d), pad x with zero columns to a size with a
  small odd part instead, e.g. 3 * 2**k, if the O(d K) term matters.
- kind="dense": K = d, P = 1, s = 1: F is one Haar-random d x d matrix (QR of a Gaussian with
  the signs of diag(R) folded in), O(d^2) per vector; the exact law TurboQuant's analysis
  assumes, best for small d.

The inverse is x = diag(s) (F^T kron H_P) y, exact up to float32 rounding.

References:
    Ailon & Chazelle, "The fast Johnson-Lindenstrauss transform", STOC 2006.
    Tseng et al., "QuIP#: even better LLM quantization with Hadamard incoherence and lattice
    codebooks", ICML 2024 (arXiv 2402.04396).
    Mezzadri, "How to generate random matrices from the classical compact groups", 2007.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Float

from vqlib import _checks
from vqlib._types import VALIDATORS, pytree_dataclass

ROTATIONS = ("hadamard", "dense")


@pytree_dataclass
class Rotation:
    """The orthogonal map y = (factor kron H_P) diag(signs) x on the last axis, d = K * P.

    Attributes:
        signs: (d,) float32 of +-1 (all ones for a dense rotation).
        factor: (K, K) float32 orthogonal; P = d // K is the Walsh-Hadamard size.
    """

    signs: jax.Array
    factor: jax.Array


def fwht(x: Float[ArrayLike, "*b d"]) -> Float[Array, "*b d"]:
    """Orthonormal fast Walsh-Hadamard transform of the last axis, O(d log d); its own inverse.

    Args:
        x: (..., d) float array, d a power of two.

    Returns:
        (..., d) H_d x in Sylvester order, H_d = H_2 kron ... kron H_2 with H_2 = [[1, 1], [1, -1]] / sqrt(2).

    Example:
        >>> import jax.numpy as jnp
        >>> from vqlib.codebooks import fwht
        >>> fwht(jnp.array([1.0, 0.0, 0.0, 0.0])).tolist()
        [0.5, 0.5, 0.5, 0.5]
    """
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"fwht needs a power-of-two length, got d={d}; use random_rotation for other d")
    return _fwht(x)


MAX_LOG_FACTOR = 6  # H_d = H_a1 kron H_a2 kron ..., each a_i <= 2**6: a small dense matrix product


def sylvester_factors(d: int) -> tuple[int, ...]:
    """Sizes (powers of two, each <= 2**MAX_LOG_FACTOR, as equal as possible, largest first)
    whose product is d: H_d (Sylvester) is the Kronecker product of the H of these sizes."""
    k = d.bit_length() - 1
    m = max(1, -(-k // MAX_LOG_FACTOR))
    return tuple(2 ** (k // m + (i < k % m)) for i in range(m))


def _sylvester(a: int) -> np.ndarray:
    """The unnormalised a x a Sylvester-order Hadamard matrix: (-1) ** popcount(i & j)."""
    i = np.arange(a)
    bits = np.bitwise_and.outer(i, i)
    parity = np.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return (1 - 2 * parity).astype(np.float32)


@jax.jit
def _fwht(x):
    """H_d x as a few small dense products (one per Kronecker factor of H_d, each a pass over x
    through a GEMM): on XLA:CPU 2.7x faster than log2(d) butterfly passes at d = 512; the whole
    rotation at d = 1,536 is 3.9x faster than a dense d x d product (benchmarks/turboquant_cpu.py)."""
    d, batch = x.shape[-1], x.shape[:-1]
    factors = sylvester_factors(d)
    y = x.reshape(-1, *factors)
    for axis, a in enumerate(factors, start=1):
        y = jnp.tensordot(y, jnp.asarray(_sylvester(a), x.dtype), axes=[[axis], [0]], precision=lax.Precision.HIGHEST)
        y = jnp.moveaxis(y, -1, axis)
    return y.reshape(*batch, d) * jnp.asarray(1.0 / math.sqrt(d), x.dtype)


def random_orthogonal(key, d: int) -> Float[Array, "{d} {d}"]:
    """A Haar-distributed (d, d) float32 orthogonal matrix: QR of a Gaussian, column j times sign(R_jj).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from vqlib.codebooks import random_orthogonal
        >>> q = random_orthogonal(jax.random.key(0), 4)
        >>> bool(jnp.allclose(q @ q.T, jnp.eye(4), atol=1e-5))
        True
    """
    q, r = jnp.linalg.qr(jax.random.normal(key, (d, d), jnp.float32))
    return q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(jnp.float32)[None, :]


def _power_of_two_part(d: int) -> int:
    return d & -d


def random_rotation(key, d: int, *, kind: str = "hadamard") -> Rotation:
    """Draws a random orthogonal transform of R^d (see the module docstring for the two kinds).

    Args:
        key: PRNG key.
        d: dimension, >= 1.
        kind: "hadamard" (random signs, fast Walsh-Hadamard, Haar factor on the odd part of d)
            or "dense" (one Haar d x d matrix).

    Returns:
        A Rotation; apply it with `rotate`, undo it with `unrotate`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from vqlib.codebooks import random_rotation, rotate, unrotate
        >>> rot = random_rotation(jax.random.key(0), 12)  # 12 = 3 * 4: a 3 x 3 factor kron H_4
        >>> x = jnp.arange(12.0)
        >>> bool(jnp.allclose(unrotate(rot, rotate(rot, x)), x, atol=1e-5))
        True
    """
    d = _checks.check_int(d, "d", low=1)
    if kind not in ROTATIONS:
        raise ValueError(f"rotation kind must be one of {ROTATIONS}, got {kind!r}")
    return _random_rotation(key, d, kind)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_rotation(key, d: int, kind: str) -> Rotation:
    if kind == "dense":
        return Rotation(jnp.ones((d,), jnp.float32), random_orthogonal(key, d))
    sign_key, factor_key = jax.random.split(key)
    signs = jax.random.rademacher(sign_key, (d,), jnp.float32)
    return Rotation(signs, random_orthogonal(factor_key, d // _power_of_two_part(d)))


def _check_dims(rot: Rotation, x) -> None:
    if x.ndim < 1 or x.shape[-1] != rot.signs.shape[-1]:
        d = rot.signs.shape[-1]
        raise ValueError(f"x must have shape (..., {d}) for this rotation, got {tuple(x.shape)}")


def rotate(rot: Rotation, x: Float[ArrayLike, "*b d"]) -> Float[Array, "*b d"]:
    """y = (F kron H_P) diag(s) x on the last axis of x (..., d), in float32.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from vqlib.codebooks import random_rotation, rotate
        >>> x = jnp.ones((5, 3, 64))                    # any leading batch axes
        >>> y = rotate(random_rotation(jax.random.key(0), 64), x)
        >>> y.shape, bool(jnp.allclose(jnp.linalg.norm(y, axis=-1), 8.0))
        ((5, 3, 64), True)
    """
    _check_dims(rot, x)
    return _rotate(rot, x)


@jax.jit
def _rotate(rot: Rotation, x):
    x = x.astype(jnp.float32) * jnp.broadcast_to(rot.signs, x.shape)
    k = rot.factor.shape[-1]
    blocks = _fwht(x.reshape(*x.shape[:-1], k, -1))  # (..., K, P)
    return _mix_blocks(rot.factor, blocks).reshape(x.shape)


UNROLL_FACTOR = 16  # a K x K factor up to this size is applied as K^2 fused multiply-adds


def _mix_blocks(factor, blocks):
    """factor (K, K) applied to the block axis of blocks (..., K, P): out[a] = sum_b F[a, b] blocks[b].

    For small K, K^2 multiply-adds over whole blocks, one fused pass (a contraction over a short
    middle axis runs 5-6x slower on XLA:CPU, measured at K = 3, P = 512); else one einsum."""
    k = factor.shape[0]
    if k == 1:
        return blocks * factor[0, 0]
    if k > UNROLL_FACTOR:
        return jnp.einsum("ab,...bp->...ap", factor, blocks, precision=lax.Precision.HIGHEST)
    rows = [sum(factor[a, b] * blocks[..., b, :] for b in range(k)) for a in range(k)]
    return jnp.stack(rows, axis=-2)


def unrotate(rot: Rotation, y: Float[ArrayLike, "*b d"]) -> Float[Array, "*b d"]:
    """The inverse of `rotate`: x = diag(s) (F^T kron H_P) y on the last axis of y (..., d).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from vqlib.codebooks import random_rotation, rotate, unrotate
        >>> rot = random_rotation(jax.random.key(0), 6, kind="dense")
        >>> x = jnp.arange(6.0)
        >>> bool(jnp.allclose(unrotate(rot, rotate(rot, x)), x, atol=1e-5))
        True
    """
    _check_dims(rot, y)
    return _unrotate(rot, y)


@jax.jit
def _unrotate(rot: Rotation, y):
    y = y.astype(jnp.float32)
    k = rot.factor.shape[-1]
    blocks = _mix_blocks(rot.factor.T, y.reshape(*y.shape[:-1], k, -1))
    return _fwht(blocks).reshape(y.shape) * jnp.broadcast_to(rot.signs, y.shape)


def validate(rot: Rotation) -> None:
    """The invariants `vqlib.load` checks: signs (d,) of +-1, an orthogonal (K, K) factor, K | d."""
    signs, factor = np.asarray(rot.signs), np.asarray(rot.factor, np.float64)
    if signs.ndim != 1 or signs.size < 1 or not np.all(np.abs(signs) == 1):
        raise ValueError(f"rotation signs must be a (d,) vector of +-1, got shape {signs.shape}")
    k = factor.shape[0] if factor.ndim == 2 else 0
    if factor.shape != (k, k) or k < 1 or signs.size % k or (signs.size // k) & (signs.size // k - 1):
        raise ValueError(
            f"rotation factor must be (K, K) with d / K a power of two, d={signs.size}, got {factor.shape}"
        )
    if not np.allclose(factor @ factor.T, np.eye(k), atol=1e-3):
        raise ValueError("rotation factor is not orthogonal (F F^T differs from the identity)")


VALIDATORS[Rotation] = validate
