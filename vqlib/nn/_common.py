"""What the nnx layers share: the state variable they update themselves, and the model's kernels."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vqlib.kernels import assign as assign_op

MAX_BITS = 8
KERNELS = nnx.All(nnx.Param, nnx.PathContains("kernel"))


class QuantizerState(nnx.Variable):
    """State a vqlib layer updates in its own forward pass; not an `nnx.Param`, so not trained."""


def _nearest(w, centroids):
    """(n, d) -> (n, d): each row replaced by its nearest centroid."""
    return jnp.take(centroids, assign_op(w, centroids)[0], axis=0)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int from 1 to {MAX_BITS} (2 to {2**MAX_BITS} kernel values), got {bits!r}")
    return bits


def _name(path) -> str:
    return "/".join(map(str, path))


def _kernels(model) -> list[tuple[str, jax.Array]]:
    """(name, value) of every kernel of `model`, in nnx's (sorted) state order."""
    return [(_name(path), var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, KERNELS))]


def _check_kernel_sizes(kernels, bits: int) -> None:
    if not kernels:
        raise ValueError("the model has no kernels (nnx.Param named 'kernel', as in nnx.Linear and nnx.Conv)")
    for name, w in kernels:
        if w.size < 2**bits:
            raise ValueError(
                f"kernel {name} has {w.size} weights, fewer than the 2**bits={2**bits} values of {bits}-bit "
                f"palettisation; use bits <= {int(math.log2(w.size)) if w.size else 0}"
            )
