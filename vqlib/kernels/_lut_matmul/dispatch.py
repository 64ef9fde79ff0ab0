"""Backend choice and argument checks for `lut_matmul`."""

from __future__ import annotations

from jaxtyping import Array, ArrayLike, Float

from vqlib import _checks
from vqlib.kernels import _dispatch
from vqlib.kernels._dispatch import Impl
from vqlib.kernels._lut_matmul.weight import LUTWeight

BACKENDS = {
    "xla": "vqlib.kernels._lut_matmul.xla:lut_matmul",
    "reference": "vqlib.kernels._lut_matmul.reference:lut_matmul_reference",
    "pallas_gpu": "vqlib.kernels._lut_matmul.pallas_gpu:lut_matmul",
}


def prefer_pallas(x, weight) -> bool:
    """Where "auto" uses the Pallas kernel: nowhere yet. Measured on an H200 (jax 0.11.2, batch 1,
    4096 x 4096 and 4096 x 14336 weights, 2-4 bits, device time over 8 weight copies): XLA's
    dequantize-then-matmul took 49-168 us, the Pallas kernel 126-639 us (best tiles 214-312 us at
    4096 x 14336, 2 bits), and the additive layouts past 2 codebooks do not fit in shared memory at
    4096 columns. The kernel decodes with one gather per weight from the codebook in global memory
    (Triton lowers no shared-memory gather): that, not the weight bytes, bounds it."""
    return False


def lut_matmul(
    x: Float[ArrayLike, "b d_in"], weight: LUTWeight, *, impl: Impl = "auto", interpret: bool = False
) -> Float[Array, "b d_out"]:
    """y = x @ W^T for a weight stored as codes plus codebooks (`LUTWeight`).

    Args:
        x: (b, in) activations, float32/bfloat16/float16.
        weight: LUTWeight of shape (out, in), from `lut_weight`.
        impl: "auto" (XLA: see `prefer_pallas`), "xla" (dequantize, then matmul), "reference" or
            "pallas_gpu" (decode on chip).
        interpret: run a Pallas backend in the Pallas interpreter.

    Returns:
        (b, out) in x's dtype, accumulated in float32.

    Example:
        >>> import jax.numpy as jnp
        >>> from vqlib.kernels import lut_matmul, lut_weight
        >>> w = lut_weight("vq", jnp.zeros((1, 2, 1), jnp.int32), jnp.array([[[1.0, 2.0]]]))  # W = [[1, 2], [1, 2]]
        >>> lut_matmul(jnp.array([[1.0, 1.0]]), w).tolist()
        [[3.0, 3.0]]
    """
    if not isinstance(weight, LUTWeight):
        raise TypeError(f"weight must be a LUTWeight (build one with lut_weight), got {type(weight).__name__}")
    _checks.check_rank(x, 2, "x", " (b, in); reshape the leading axes into one")
    _checks.check_float_dtype(x, "x")
    _checks.check_dim(x, weight.shape[1], what="the weight has")
    return _dispatch.dispatch(
        "lut_matmul", impl, BACKENDS, (x, weight), interpret=interpret, prefer_pallas=prefer_pallas
    )
