"""The semantics of `lut_matmul`: decode W fully, then one float32 matmul."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Float

from vqlib.kernels._lut_matmul.weight import LUTWeight, dequantize


@jax.jit
def lut_matmul_reference(x: Float[ArrayLike, "b d_in"], weight: LUTWeight) -> Float[Array, "b d_out"]:
    """y = x @ W^T for the W that `weight` stores; float32 math, output in x's dtype.

    Args:
        x: (b, in) activations.
        weight: a LUTWeight of shape (out, in).

    Returns:
        (b, out) in x.dtype.
    """
    w = dequantize(weight)
    return jnp.dot(x.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST).astype(x.dtype)
