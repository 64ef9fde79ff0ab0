"""How an index scores its rows, from what its codebook offers (never from a codec name).

Three strategies, fixed per index by `Static.strategy`:
- "raw": rows are the vectors themselves (no codebook).
- "tables": the codebook has lookup tables (`vqlib.adc_tables`): a row's score is the sum of its
  codes' table entries plus a per-list term and the row's stored bias. `fast_scan` rounds the
  tables of each query to integers in [0, 255] (the minimum of each table moves to the bias) as
  faiss's fast-scan does.
- "estimate": the codebook scores codes itself (`vqlib.inner_product`, `vqlib.codebooks.sq_norms`).

Rows code the residual r = x - c of their list's centroid c, so for a query q, with y = q - c,
- the L2 form: ||q - x||^2 = ||y - r||^2 = ||y||^2 - 2 <y, r> + ||r||^2 (tables of y sum to it);
- the inner-product form: <q, x> = <q, c> + <q, r>.
"cos" searches unit vectors in the inner-product form, or in the L2 form (-cos = ||q - x||^2 / 2 - 1)
when the codebook declares `cos_as_l2`. Scores are "smaller is better" inside: distances, or
minus inner products.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from vqlib.codebooks import adc_tables, codebook_type, has_tables, inner_product, sq_norms, unpack_codes
from vqlib.retrieval._index import Index, code_width, pack_bits

_HIGHEST = lax.Precision.HIGHEST


class Parts(NamedTuple):
    """The arrays a search reads (one shard's, under `shard_map`)."""

    centroids: jax.Array  # (nlist, d)
    codebook: object
    data: jax.Array  # (n, w)
    bias: jax.Array | None  # (n,)
    offsets: jax.Array  # (nlist + 1,)
    live: jax.Array  # (n,)


class Static(NamedTuple):
    """What fixes the compiled program."""

    strategy: str  # "raw", "tables" or "estimate"
    l2: bool  # the L2 form (else the inner-product form)
    fast_scan: bool
    bits: int  # pack width of the codes (0 for raw rows)
    width: int  # code columns per row (0 for raw rows)
    scalar_codes: bool  # the codebook takes codes (n,), not (n, 1)


def parts_of(index: Index) -> Parts:
    return Parts(index.centroids, index.codebook, index.data, index.bias, index.offsets, index.live)


def static_of(index: Index) -> Static:
    cb = index.codebook
    if cb is None:
        return Static("raw", index.metric == "l2", False, 0, 0, False)
    t = codebook_type(cb)
    strategy = "tables" if has_tables(cb) else "estimate"
    l2 = index.metric == "l2" or (index.metric == "cos" and t.cos_as_l2)
    return Static(strategy, l2, index.fast_scan, pack_bits(index), code_width(index), t.scalar_codes)


def to_public(index: Index, dists):
    """Internal scores -> the metric's: squared L2 distances, inner products or cosines."""
    if index.metric == "l2":
        return dists
    l2 = static_of(index).l2
    return 1.0 - dists / 2.0 if l2 else -dists  # cos_as_l2: -cos = d / 2 - 1


def codes_of(rows, s: Static):
    """Packed rows (n, bytes) -> codes in the codebook's own shape ((n, w), or (n,) for scalar codes)."""
    codes = unpack_codes(rows, s.bits, s.width)
    return codes[:, 0] if s.scalar_codes else codes


# ----------------------------------------------------------------------------- tables


def probe_tables(parts: Parts, query, probes, s: Static):
    """Lookup tables of one query for its probed lists: (tables (P, m, k), bias (P,), scale ()).

    A row of probed list p scores sum_j tables[p, j, code_j] / scale + bias[p] (+ its own stored
    bias). L2: the tables of y = q - c_p; inner product: one table set shared by the lists, and
    -<q, c_p> in the bias. Fast-scan rounds the tables to integers in [0, 255] (negated for inner
    products) with one scale for all of the query's tables (each table's minimum goes to the
    bias), as faiss does."""
    cb = parts.codebook
    centres = parts.centroids[probes]  # (P, d)
    if s.l2:
        tables = adc_tables(cb, query[None, :] - centres, metric="l2")
        bias = jnp.zeros(probes.shape, jnp.float32)
    else:
        shared = -adc_tables(cb, query[None, :], metric="ip")
        tables = jnp.broadcast_to(shared, (probes.shape[0], *shared.shape[1:]))
        bias = -jnp.matmul(centres, query, precision=_HIGHEST)
    if not s.fast_scan:
        return tables, bias, jnp.float32(1.0)
    # faiss's rounding (IndexFastScan::compute_quantized_LUT), so that both engines rank alike: the
    # tables as faiss holds them (squared distances; inner products, larger better), each minus its
    # minimum, one scale for all (255 over the largest span), rounded half up
    sign = 1.0 if s.l2 else -1.0
    held = sign * tables
    low = jnp.min(held, axis=-1, keepdims=True)
    span = jnp.max(held - low)
    scale = 255.0 / jnp.where(span > 0, span, 1.0)
    levels = jnp.floor((held - low) * scale + 0.5)
    return sign * levels, bias + sign * jnp.sum(low[..., 0], axis=-1), scale


def block_scores_tables(tables, codes, scale):
    """(q, m, k) tables (shared by the block's rows), (B, m) codes -> (q, B) sums / scale: one-hot
    codes times the tables, a matrix product (exact integer sums for fast-scan's integer tables)."""
    onehot = jax.nn.one_hot(codes, tables.shape[-1], dtype=jnp.float32).reshape(codes.shape[0], -1)
    acc = jnp.matmul(tables.reshape(tables.shape[0], -1), onehot.T, precision=_HIGHEST)
    return acc / scale[:, None]


# ----------------------------------------------------------------------------- estimates


def estimate_scores(parts: Parts, ys, codes, s: Static):
    """(q, d) query-side vectors, (B, w) codes -> (q, B): the L2 form ||y||^2 - 2 <y, r> + ||r||^2,
    or minus the inner product, both from the codebook's estimator."""
    est = inner_product(parts.codebook, codes, ys)
    if not s.l2:
        return -est
    return jnp.sum(ys * ys, axis=1)[:, None] - 2.0 * est + sq_norms(parts.codebook, codes)[None, :]


def exact_scores(queries, x, l2: bool):
    """(q, d) queries, (B, d) vectors -> (q, B) squared distances or minus inner products."""
    dots = jnp.matmul(queries, x.T, precision=_HIGHEST)
    if not l2:
        return -dots
    return jnp.sum(x * x, axis=1)[None, :] - 2.0 * dots + jnp.sum(queries * queries, axis=1)[:, None]
