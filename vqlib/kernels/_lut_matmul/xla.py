"""Dequantize-then-matmul in plain XLA: W is decoded to x's dtype in HBM, then one dot with
float32 accumulation. The baseline the Pallas kernel must beat at small batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from vqlib.kernels._lut_matmul.weight import LUTWeight, dequantize


@jax.jit
def lut_matmul(x: jax.Array, weight: LUTWeight) -> jax.Array:
    """Same contract as `lut_matmul_reference`."""
    w = dequantize(weight).astype(x.dtype)
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else lax.Precision.DEFAULT
    y = jnp.dot(x, w.T, precision=precision, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
