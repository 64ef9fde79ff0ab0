"""Nearest-centroid assignment: (n, d) points, (k, d) centroids -> (codes, squared distances).

`impl="auto"` tries the backends that fit the device in order and ends at "xla" (tiled, any
device); an explicit `impl` never falls back. Pallas backends arrive with the kernels issue.
"""

from __future__ import annotations

from typing import Literal

import jax

from vqlib.kernels.assign.reference import assign_reference as assign_reference
from vqlib.kernels.assign.xla import BlockSizes as BlockSizes
from vqlib.kernels.assign.xla import assign as assign_xla

Impl = Literal["auto", "xla", "reference"]
_BACKENDS = {"xla": assign_xla, "reference": assign_reference}


def _candidates(impl: str) -> tuple[str, ...]:
    if impl == "auto":
        return ("xla",)
    if impl not in _BACKENDS:
        raise ValueError(f"impl must be one of {sorted(['auto', *_BACKENDS])}, got {impl!r}")
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
    errors = []
    for name in _candidates(impl):
        try:
            return _BACKENDS[name](x, centroids)
        except NotImplementedError as e:
            errors.append(e)
    raise ExceptionGroup("no assign implementation accepts these inputs", errors)
