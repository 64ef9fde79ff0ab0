"""Quantizers built from quantizers, in the optax manner: `residual(q1, q2, ...)` and
`dim_weighted(q, w)` are Quantizers.

    >>> import jax, vqlib
    >>> coarse_then_pq = vqlib.residual(vqlib.quantizer("kmeans", k=64), vqlib.quantizer("pq", m=4, k=16))
    >>> x = jax.random.normal(jax.random.key(1), (2000, 16))
    >>> cb = coarse_then_pq.fit(jax.random.key(0), x)   # k-means, then PQ of what it leaves
    >>> codes = vqlib.encode(cb, x)                      # (2000, 1 + 4): the stages' codes side by side
    >>> vqlib.decode(cb, codes).shape
    (2000, 16)

`residual`: stage j is fitted to, and encodes, the residual x - (decoded stages < j), greedily; the codes
of all stages sit side by side in one (n, sum of m_j) int32 array. The chain is a codebook like
any other: `vqlib.encode` / `decode` / `save` / `load` take it.

`dim_weighted(q, w)` fits q to x * sqrt(w), so that its encoder and fit minimise the weighted
error sum_j w_j (x_j - x_hat_j)^2 (e.g. w = the diagonal of a layer's input Hessian).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from vqlib import _checks, _fit
from vqlib._types import CodeLayout, Quantizer, pytree_dataclass, static_field


@pytree_dataclass
class ResidualChain:
    """Codebooks applied in turn, each to what the previous ones leave.

    Attributes:
        stages: the stage codebooks, in order.
        widths: code columns of each stage; None for a stage whose codes are one per vector
            (k-means: codes (n,)), stored as one column.
    """

    stages: tuple
    widths: tuple = static_field(())


def quantizer(method: str, **options) -> Quantizer:
    """The method's Quantizer with `options` bound: fit(key, x) takes no further options.

    Example:
        >>> import jax, vqlib
        >>> q = vqlib.quantizer("pq", m=2, k=8)
        >>> q.fit(jax.random.key(0), jax.random.normal(jax.random.key(1), (100, 4))).centroids.shape
        (2, 8, 2)
    """
    q = _fit.method_quantizer(method)
    _fit.check_options(method, options)
    return q._replace(fit=functools.partial(q.fit, **options))


def _columns(codes) -> jax.Array:
    return codes[:, None] if codes.ndim == 1 else codes


def residual(*quantizers: Quantizer) -> Quantizer:
    """Chains quantizers: stage j fits and codes the residual of stages < j.

    Args:
        *quantizers: at least one Quantizer whose fit takes (key, x) (see `vqlib.quantizer`).

    Returns:
        A Quantizer whose codebook is a `ResidualChain`.
    """
    if not quantizers or not all(isinstance(q, Quantizer) for q in quantizers):
        raise TypeError("residual() takes one or more Quantizers, e.g. residual(vqlib.quantizer('kmeans', k=256), ...)")

    def fit(key, x):
        x = _checks.check_float_array(x, "x", ndim=2).astype(jnp.float32)
        stages, widths = [], []
        for q, stage_key in zip(quantizers, jax.random.split(key, len(quantizers)), strict=True):
            cb = q.fit(stage_key, x)
            codes = q.encode(cb, x)
            x = x - q.decode(cb, codes)
            stages.append(cb)
            widths.append(None if codes.ndim == 1 else codes.shape[1])
        return ResidualChain(tuple(stages), tuple(widths))

    return Quantizer(fit, encode, decode, layout)


def encode(cb: ResidualChain, x) -> jax.Array:
    """(n, d) -> (n, sum of stage widths) int32: each stage's codes of the running residual."""
    x = _checks.check_float_array(x, "x", ndim=2).astype(jnp.float32)
    codes = []
    for stage in cb.stages:
        c = _fit.encode(stage, x)
        x = x - _fit.decode(stage, c)
        codes.append(_columns(c))
    return jnp.concatenate(codes, axis=1)


def decode(cb: ResidualChain, codes) -> jax.Array:
    """(n, sum of stage widths) codes -> (n, d): the sum of the stages' reconstructions."""
    total = sum(1 if w is None else w for w in cb.widths)
    codes = _checks.check_codes(codes, layout(cb).num_codes, width=total)
    start, x_hat = 0, 0.0
    for stage, w in zip(cb.stages, cb.widths, strict=True):
        c = codes[:, start] if w is None else codes[:, start : start + w]
        x_hat = x_hat + _fit.decode(stage, c)
        start += 1 if w is None else w
    return x_hat


def layout(cb: ResidualChain) -> CodeLayout:
    """Columns of all stages, packed at the widest stage's bit-width; side bits add up."""
    parts = [_fit.code_layout(stage) for stage in cb.stages]
    return CodeLayout(
        sum(p.num_codebooks for p in parts), max(p.num_codes for p in parts), sum(p.side_bits for p in parts)
    )


_fit.register(ResidualChain, Quantizer(None, encode, decode, layout))  # built by residual(), not by name


@pytree_dataclass
class DimWeighted:
    """A codebook of x * scale: decode divides by scale again.

    Attributes:
        inner: the codebook fitted to x * scale.
        scale: (d,) float32, the square roots of the dimension weights.
    """

    inner: Any
    scale: jax.Array


def dim_weighted(quantizer: Quantizer, dim_weights) -> Quantizer:
    """Weights the squared error of dimension j by dim_weights[j] (> 0) in fit and encode.

    Example:
        >>> import jax, jax.numpy as jnp, vqlib
        >>> q = vqlib.dim_weighted(vqlib.quantizer("pq", m=2, k=8), jnp.array([4.0, 4.0, 1.0, 1.0]))
        >>> cb = q.fit(jax.random.key(0), jax.random.normal(jax.random.key(1), (100, 4)))
        >>> cb.scale.tolist()
        [2.0, 2.0, 1.0, 1.0]
    """
    w = _checks.check_float_array(dim_weights, "dim_weights", ndim=1)
    if _checks.is_concrete(w) and not bool(jnp.all(w > 0)):
        raise ValueError("dim_weights must be > 0 everywhere; drop a dimension instead of giving it weight 0")
    scale = jnp.sqrt(w.astype(jnp.float32))

    def fit(key, x):
        x = _checks.check_float_array(x, "x", ndim=2)
        _checks.check_dim(x, scale.shape[0], what="dim_weights has")
        return DimWeighted(quantizer.fit(key, x.astype(jnp.float32) * scale[None]), scale)

    return Quantizer(fit, weighted_encode, weighted_decode, weighted_layout, weighted_tables)


def weighted_encode(cb: DimWeighted, x) -> jax.Array:
    x = _checks.check_float_array(x, "x", ndim=2)
    _checks.check_dim(x, cb.scale.shape[0])
    return _fit.encode(cb.inner, x.astype(jnp.float32) * cb.scale[None])


def weighted_decode(cb: DimWeighted, codes) -> jax.Array:
    return _fit.decode(cb.inner, codes) / cb.scale[None]


def weighted_layout(cb: DimWeighted) -> CodeLayout:
    return _fit.code_layout(cb.inner)


def weighted_tables(cb: DimWeighted, queries, *, metric: str = "l2") -> jax.Array:
    """Inner-product tables only: <q, x_hat> = <q / scale, inner x_hat>; an L2 distance in the
    original space does not split over the inner codebook's tables."""
    if metric != "ip":
        raise NotImplementedError("a dim_weighted codebook has inner-product tables only; use metric='ip' or decode")
    queries = _checks.check_float_array(queries, "queries", ndim=2)
    _checks.check_dim(queries, cb.scale.shape[0], "queries")
    return _fit.adc_tables(cb.inner, queries.astype(jnp.float32) / cb.scale[None], metric="ip")


_fit.register(DimWeighted, Quantizer(None, weighted_encode, weighted_decode, weighted_layout, weighted_tables))
