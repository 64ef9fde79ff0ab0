"""Round-to-nearest: per-group asymmetric uniform quantization, the baseline of every table.

Each row of W (out, in) is cut into groups of `group_size` consecutive input columns (the last
group may be shorter when group_size does not divide in); a group of b-bit codes stores its
step and offset in float16 (32 bits per group): w ~ offset + step * q, q in [0, 2**b),
offset = min(group), step = (max - min) / (2**b - 1), q = round((w - offset) / step).
Bits per weight: b + 32 / group_size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vqlib import _checks
from vqlib.llm._common import check_known
from vqlib.llm._weights import CompressedWeight, coded_part

MAX_BITS = 8


def check_options(bits, options: dict) -> dict:
    """Resolved options of "rtn": group_size (default 128)."""
    bits = _checks.check_int(bits, "bits", low=1, high=MAX_BITS)
    check_known(options, ("group_size",), "rtn")
    group = _checks.check_int(options.get("group_size", 128), "group_size", low=1)
    return dict(bits=bits, group_size=group)


def check_shape(name: str, shape, *, bits: int, group_size: int) -> None:
    if group_size > shape[1]:
        raise ValueError(
            f"{name} has {shape[1]} input columns, fewer than group_size={group_size}; use group_size <= {shape[1]}"
        )


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def _quantize(w, *, bits: int, group_size: int):
    """w (out, in) -> codes (out, in) int32, (step, offset) (out, groups, 2) float16-exact."""
    out, n_in = w.shape
    groups = -(-n_in // group_size)
    pad = groups * group_size - n_in
    wp = jnp.pad(w, ((0, 0), (0, pad)), mode="edge").reshape(out, groups, group_size)  # edge: no new extremes
    lo, hi = jnp.min(wp, axis=-1), jnp.max(wp, axis=-1)
    levels = 2**bits - 1
    step = ((hi - lo) / levels).astype(jnp.float16).astype(jnp.float32)
    offset = lo.astype(jnp.float16).astype(jnp.float32)
    safe = jnp.where(step > 0, step, 1.0)
    q = jnp.clip(jnp.round((wp - offset[..., None]) / safe[..., None]), 0, levels).astype(jnp.int32)
    return q.reshape(out, -1)[:, :n_in], jnp.stack([step, offset], axis=-1)


def quantize_rtn(w, *, bits: int, group_size: int) -> CompressedWeight:
    """A float (out, in) weight -> CompressedWeight with one "affine" part.

    Example:
        >>> import numpy as np
        >>> from vqlib.llm._rtn import quantize_rtn
        >>> from vqlib.llm import linear
        >>> w = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
        >>> cw = quantize_rtn(w, bits=8, group_size=4)
        >>> bool(np.allclose(linear(np.eye(8, dtype=np.float32), cw).T, w, atol=1e-2))
        True
    """
    w = jnp.asarray(w, jnp.float32)
    codes, side = _quantize(w, bits=bits, group_size=group_size)
    part = coded_part("affine", codes[None], side, np.ones(1, np.float32), bits=bits, group=group_size, shape=w.shape)
    return CompressedWeight((part,))


NEEDS_CALIBRATION = False


def compress_weight(key, w, hessian, *, bits: int, group_size: int, embedding: bool = False) -> CompressedWeight:
    """The `compress` entry point: RTN ignores the key, the Hessian and the weight's role."""
    del key, hessian, embedding
    return quantize_rtn(w, bits=bits, group_size=group_size)
