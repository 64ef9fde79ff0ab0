"""Dimension-weighted composition: `dim_weighted(q, w)` fits q to x * sqrt(w), so that its encoder
and fit minimise the weighted error sum_j w_j (x_j - x_hat_j)^2 (e.g. w = the diagonal of a
layer's input Hessian)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from vqlib import _checks
from vqlib._types import CodeLayout, pytree_dataclass
from vqlib.codebooks import _protocol
from vqlib.codebooks._protocol import Quantizer


@pytree_dataclass
class DimWeighted:
    """A codebook of x * scale: decode divides by scale again.

    Attributes:
        inner: the codebook fitted to x * scale.
        scale: (d,) float32, the square roots of the dimension weights.
    """

    inner: Any
    scale: jax.Array


def dim_weighted(quantizer: Quantizer, dim_weights: Float[ArrayLike, " d"]) -> Quantizer:
    """Weights the squared error of dimension j by dim_weights[j] (> 0) in fit and encode.

    Example:
        >>> import jax, jax.numpy as jnp, vqlib
        >>> q = vqlib.dim_weighted(vqlib.quantizer("pq", m=2, k=8), jnp.array([4.0, 4.0, 1.0, 1.0]))
        >>> cb = q.fit(jax.random.key(0), jax.random.normal(jax.random.key(1), (100, 4)))
        >>> cb.scale.tolist()
        [2.0, 2.0, 1.0, 1.0]
    """
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"dim_weighted takes a Quantizer (see vqlib.quantizer), got {type(quantizer).__name__}")
    w = _checks.check_float_array(dim_weights, "dim_weights", ndim=1)
    if _checks.is_concrete(w) and not bool(jnp.all(w > 0)):
        raise ValueError("dim_weights must be > 0 everywhere; drop a dimension instead of giving it weight 0")
    scale = jnp.sqrt(w.astype(jnp.float32))

    def fit(key, x):
        x = _checks.check_float_array(x, "x", ndim=2, vectors=True)
        _checks.check_dim(x, scale.shape[0], what="dim_weights has")
        return DimWeighted(quantizer.fit(key, x.astype(jnp.float32) * scale[None]), scale)

    return Quantizer(fit)


def _inner(cb: DimWeighted):
    return _protocol.codebook_type(cb.inner)


def encode(cb: DimWeighted, x: Float[Array, "n d"]) -> Int[Array, "n w"]:
    return _inner(cb).encode(cb.inner, x.astype(jnp.float32) * cb.scale[None])


def decode(cb: DimWeighted, codes: Int[Array, "n w"]) -> Float[Array, "n d"]:
    return _inner(cb).decode(cb.inner, codes) / cb.scale[None]


def layout(cb: DimWeighted) -> CodeLayout:
    return _protocol.code_layout(cb.inner)


def dim(cb: DimWeighted) -> int:
    return cb.scale.shape[0]


def ip_tables(cb: DimWeighted, queries: Float[Array, "q d"]) -> Float[Array, "q m k"]:
    """<q, x_hat> = <q / scale, inner x_hat>: the inner codebook's tables of q / scale."""
    return _inner(cb).ip_tables(cb.inner, queries / cb.scale[None])


def validate(cb: DimWeighted) -> None:
    _protocol.validate_codebook(cb.inner, "inner")
    if cb.scale.ndim != 1 or cb.scale.shape[0] != _protocol.dim(cb.inner) or not bool(jnp.all(cb.scale > 0)):
        raise ValueError(f"scale must be ({_protocol.dim(cb.inner)},) and > 0, got shape {cb.scale.shape}")


_protocol.register(
    DimWeighted,
    encode=encode,
    decode=decode,
    layout=layout,
    dim=dim,
    ip_tables=ip_tables,
    tables_available=lambda cb: _protocol.has_tables(cb.inner),
    validate=validate,
)
