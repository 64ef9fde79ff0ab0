"""Backend choice for `assign`: "auto" tries the Pallas kernel of the device, then "xla" (the only
choice on CPU); an explicit `impl` never falls back."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Float32, Int32

from vqlib import _checks
from vqlib.kernels import _dispatch
from vqlib.kernels._dispatch import Impl

BACKENDS = {
    "xla": "vqlib.kernels._assign.xla:assign",
    "reference": "vqlib.kernels._assign.reference:assign_reference",
    "pallas_gpu": "vqlib.kernels._assign.pallas_gpu:assign",
    "pallas_tpu": "vqlib.kernels._assign.pallas_tpu:assign",
    "faiss": "vqlib.kernels._assign.faiss_cpu:assign",
}


def prefer_faiss(x, centroids) -> bool:
    """Where "auto" on CPU hands `assign` to faiss: not yet (measured in benchmarks/kmeans_cpu.py)."""
    return False


def fitting_impl(dim: int, n: int, k: int) -> str:
    """The `assign` backend for fitting k centroids to n points of `dim` dimensions (nothing is
    differentiated through a fit): faiss on CPU for thin points (dim <= 16) and n * k >= 2**22,
    where XLA:CPU's short dots lose to faiss's loops (PQ training, 100,000 x 128 in 16 subspaces
    of 256 centroids on a 2-core Xeon: 7.0 s against 10.1-10.6 s, the same codebook), else
    "auto". Smaller fits stay with XLA: a program holding faiss's host callback is compiled again
    in every process (JAX's persistent cache does not keep it). `prefer_faiss` stays off for
    `assign` in general: the faiss backend carries no gradient."""
    big = dim <= 16 and n * k >= 2**22
    return "faiss" if big and _dispatch.platform() == "cpu" and _dispatch.faiss_available() else "auto"


def prefer_pallas(x, centroids) -> bool:
    """Where "auto" uses the device's Pallas kernel. On a GPU only for 16-bit inputs: float32 at
    full precision has no tensor-core path in Triton (measured on an H200, jax 0.11.2, n = 1M,
    d = 128, k = 1,024: Pallas 136-380 ms against XLA's 11.2 ms; fp16: Pallas 0.99 ms against
    XLA's 5.06 ms, 264 against 52 TFLOP/s; k = 8,192: 5.8 against 42 ms). benchmarks/RESULTS.md."""
    if _dispatch.platform() != "gpu":
        return True
    return x.dtype != jnp.float32 and centroids.dtype == x.dtype


def check_impl(impl: str) -> tuple[str, ...]:
    """The backends to try, in order, for `impl`; raises ValueError for an unknown name."""
    return _dispatch.check_impl(impl, BACKENDS)


def assign(
    x: Float[ArrayLike, "n d"], centroids: Float[ArrayLike, "k d"], *, impl: Impl = "auto", interpret: bool = False
) -> tuple[Int32[Array, " n"], Float32[Array, " n"]]:
    """Nearest centroid for each point; ties go to the lowest index.

    Args:
        x: (n, d) points, float16/bfloat16/float32.
        centroids: (k, d) centroids.
        impl: "auto" (the device's Pallas kernel when it takes the inputs, else "xla"), "xla",
            "reference", "pallas_gpu" or "pallas_tpu".
        interpret: run a Pallas backend in the Pallas interpreter (any device; slow).

    Returns:
        codes (n,) int32 and squared distances (n,) float32, clamped at 0.

    Example:
        >>> import jax.numpy as jnp
        >>> from vqlib.kernels import assign
        >>> assign(jnp.eye(3), jnp.eye(3)[::-1])[0].tolist()
        [2, 1, 0]
    """
    x = _checks.check_float_array(x, "x", vectors=True)
    centroids = _checks.check_float_array(centroids, "centroids", vectors=True)
    _checks.check_rank(x, 2, "x", "; use jax.vmap for a batch of problems")
    _checks.check_rank(centroids, 2, "centroids", "; use jax.vmap for a batch of codebooks")
    _checks.check_dim(x, centroids.shape[1], what="centroids have")
    if centroids.shape[0] < 1:
        raise ValueError("centroids must hold at least one row")
    return _dispatch.dispatch(
        "assign",
        impl,
        BACKENDS,
        (x, centroids),
        interpret=interpret,
        prefer_faiss=prefer_faiss,
        prefer_pallas=prefer_pallas,
    )
