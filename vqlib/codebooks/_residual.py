"""Residual composition: `residual(q1, q2, ...)` chains quantizers, stage j fitting and coding
what stages < j leave (greedily).

    >>> import jax, vqlib
    >>> coarse_then_pq = vqlib.residual(vqlib.quantizer("kmeans", k=64), vqlib.quantizer("pq", m=4, k=16))
    >>> x = jax.random.normal(jax.random.key(1), (2000, 16))
    >>> cb = coarse_then_pq.fit(jax.random.key(0), x)   # k-means, then PQ of what it leaves
    >>> codes = vqlib.encode(cb, x)                      # (2000, 1 + 4): the stages' codes side by side
    >>> vqlib.decode(cb, codes).shape
    (2000, 16)

The codes of all stages sit side by side in one (n, sum of w_j) int32 array. The chain is a
codebook like any other: `vqlib.encode` / `decode` / `save` / `load` take it, and when every
stage has lookup tables of the same size, so does the chain (inner products add up over stages).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from vqlib import _checks
from vqlib._types import CodeLayout, pytree_dataclass, static_field
from vqlib.codebooks import _protocol
from vqlib.codebooks._protocol import Quantizer


@pytree_dataclass
class ResidualChain:
    """Codebooks applied in turn, each to what the previous ones leave.

    Attributes:
        stages: the stage codebooks, in order.
        widths: code columns of each stage.
    """

    stages: tuple
    widths: tuple = static_field(())


def residual(*quantizers: Quantizer) -> Quantizer:
    """Chains quantizers: stage j fits and codes the residual of stages < j.

    Args:
        *quantizers: at least one Quantizer (see `vqlib.quantizer`).

    Returns:
        A Quantizer whose codebook is a `ResidualChain`.

    Example:
        >>> import jax, vqlib
        >>> q = vqlib.residual(vqlib.quantizer("kmeans", k=8), vqlib.quantizer("kmeans", k=8))
        >>> vqlib.code_layout(q.fit(jax.random.key(0), jax.random.normal(jax.random.key(1), (500, 4))))
        CodeLayout(num_codebooks=2, num_codes=8, side_bits=0)
    """
    if not quantizers or not all(isinstance(q, Quantizer) for q in quantizers):
        raise TypeError("residual() takes one or more Quantizers, e.g. residual(vqlib.quantizer('kmeans', k=256), ...)")

    def fit(key, x):
        x = _checks.check_float_array(x, "x", ndim=2, vectors=True).astype(jnp.float32)
        stages, widths = [], []
        for q, stage_key in zip(quantizers, jax.random.split(key, len(quantizers)), strict=True):
            cb = q.fit(stage_key, x)
            codes = _columns(cb, _protocol.encode(cb, x))
            x = x - _protocol.codebook_type(cb).decode(cb, _uncolumns(cb, codes))
            stages.append(cb)
            widths.append(codes.shape[1])
        return ResidualChain(tuple(stages), tuple(widths))

    return Quantizer(fit)


def _columns(stage, codes):
    return codes[:, None] if _protocol.codebook_type(stage).scalar_codes else codes


def _uncolumns(stage, codes):
    return codes[:, 0] if _protocol.codebook_type(stage).scalar_codes else codes


def _split(cb: ResidualChain, codes):
    """(n, sum of widths) -> each stage's codes, in the stage's own shape."""
    start, parts = 0, []
    for stage, w in zip(cb.stages, cb.widths, strict=True):
        parts.append(_uncolumns(stage, codes[:, start : start + w]))
        start += w
    return parts


def encode(cb: ResidualChain, x: Float[Array, "n d"]) -> Int[Array, "n w"]:
    """(n, d) -> (n, sum of stage widths) int32: each stage's codes of the running residual."""
    x = x.astype(jnp.float32)
    codes = []
    for stage in cb.stages:
        t = _protocol.codebook_type(stage)
        c = t.encode(stage, x)
        x = x - t.decode(stage, c)
        codes.append(_columns(stage, c))
    return jnp.concatenate(codes, axis=1)


def decode(cb: ResidualChain, codes: Int[Array, "n w"]) -> Float[Array, "n d"]:
    """(n, sum of stage widths) codes -> (n, d): the sum of the stages' reconstructions."""
    parts = [_protocol.codebook_type(s).decode(s, c) for s, c in zip(cb.stages, _split(cb, codes), strict=True)]
    return sum(parts[1:], parts[0])


def layout(cb: ResidualChain) -> CodeLayout:
    """Columns of all stages, packed at the widest stage's bit-width; side bits add up."""
    parts = [_protocol.code_layout(stage) for stage in cb.stages]
    return CodeLayout(
        sum(p.num_codebooks for p in parts), max(p.num_codes for p in parts), sum(p.side_bits for p in parts)
    )


def dim(cb: ResidualChain) -> int:
    return _protocol.dim(cb.stages[0])


def ip_tables(cb: ResidualChain, queries: Float[Array, "q d"]) -> Float[Array, "q m k"]:
    """The stages' inner-product tables side by side (every stage needs tables with one k)."""
    if not tables_available(cb):
        raise NotImplementedError("a residual chain has lookup tables only when every stage has tables of one size")
    return jnp.concatenate([_protocol.codebook_type(s).ip_tables(s, queries) for s in cb.stages], axis=1)


def tables_available(cb: ResidualChain) -> bool:
    sizes = {_protocol.code_layout(s).num_codes for s in cb.stages}
    return all(_protocol.has_tables(s) for s in cb.stages) and len(sizes) == 1


def inner_product(cb: ResidualChain, codes, queries):
    parts = _split(cb, codes)
    return sum(
        _protocol.inner_product_of(_protocol.codebook_type(s), s, c, queries)
        for s, c in zip(cb.stages, parts, strict=True)
    )


def validate(cb: ResidualChain) -> None:
    if len(cb.stages) != len(cb.widths) or not cb.stages:
        raise ValueError(f"a ResidualChain needs one width per stage, got {len(cb.stages)} stages, widths {cb.widths}")
    for i, stage in enumerate(cb.stages):
        _protocol.validate_codebook(stage, f"stages[{i}]")
        if _protocol.code_layout(stage).num_codebooks != cb.widths[i]:
            raise ValueError(
                f"stages[{i}] has {_protocol.code_layout(stage).num_codebooks} code columns, widths says {cb.widths[i]}"
            )
        if _protocol.dim(stage) != dim(cb):
            raise ValueError(f"stages[{i}] codes d={_protocol.dim(stage)}, stage 0 d={dim(cb)}")


_protocol.register(
    ResidualChain,
    encode=encode,
    decode=decode,
    layout=layout,
    dim=dim,
    ip_tables=ip_tables,
    tables_available=tables_available,
    inner_product=inner_product,
    validate=validate,
)
