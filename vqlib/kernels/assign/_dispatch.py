"""Backend choice for `assign`: "auto" tries the backends that fit the device, ending at "xla";
an explicit `impl` never falls back. Pallas backends arrive with the kernels issue."""

from __future__ import annotations

from typing import Literal

import jax

from vqlib import _checks
from vqlib.kernels.assign.reference import assign_reference
from vqlib.kernels.assign.xla import assign as assign_xla

Impl = Literal["auto", "xla", "reference"]
BACKENDS = {"xla": assign_xla, "reference": assign_reference}


def check_impl(impl: str) -> tuple[str, ...]:
    """The backends to try, in order, for `impl`; raises ValueError for an unknown name."""
    if impl == "auto":
        return ("xla",)
    if impl not in BACKENDS:
        raise ValueError(f"impl must be one of {sorted(['auto', *BACKENDS])}, got {impl!r}")
    return (impl,)


def assign(x: jax.Array, centroids: jax.Array, *, impl: Impl = "auto") -> tuple[jax.Array, jax.Array]:
    """Nearest centroid for each point; ties go to the lowest index.

    Args:
        x: (n, d) points, float16/bfloat16/float32.
        centroids: (k, d) centroids.
        impl: backend; "auto" picks the fastest available.

    Returns:
        codes (n,) int32 and squared distances (n,) float32, clamped at 0.
    """
    _checks.check_rank(x, 2, "x", "; use jax.vmap for a batch of problems")
    _checks.check_rank(centroids, 2, "centroids", "; use jax.vmap for a batch of codebooks")
    _checks.check_dim(x, centroids.shape[1], what="centroids have")
    if centroids.shape[0] < 1:
        raise ValueError("centroids must hold at least one row")
    errors = []
    for name in check_impl(impl):
        try:
            return BACKENDS[name](x, centroids)
        except NotImplementedError as e:
            errors.append(e)
    raise ExceptionGroup("no assign implementation accepts these inputs", errors)
