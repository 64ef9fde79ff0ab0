"""The full scan: every row of the index, read in blocks shared by a chunk of queries.

Used for the flat indexes, and for inverted lists probed at nprobe = nlist when rows can be
scored without per-list tables. Scoring a block is a matrix product: raw rows, or rows decoded
to c + decode(code) (exact for table codebooks), or one-hot codes against fast-scan's integer
tables, or the codebook's own estimator.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from vqlib.codebooks import decode
from vqlib.retrieval._lists import row_lists
from vqlib.retrieval._scoring import (
    Parts,
    Static,
    block_scores_tables,
    codes_of,
    estimate_scores,
    exact_scores,
    probe_tables,
)

_BLOCK = 4096  # database rows per step
_QUERY_CHUNK = 256  # queries per step


def _score_block(parts: Parts, queries, rows, lists, state, s: Static):
    """Scores (qc, B) of a block of rows (B, w) shared by the queries (qc, d)."""
    if s.strategy == "raw":
        return exact_scores(queries, rows, s.l2)
    codes = codes_of(rows, s)
    if s.strategy == "estimate":  # flat only: the residual is the vector
        return estimate_scores(parts, queries, codes, s)
    if s.fast_scan:
        tables, bias, scale = state
        return block_scores_tables(tables[:, 0], codes, scale) + bias[:, :1]
    x_hat = parts.centroids[lists] + decode(parts.codebook, codes)  # c + decode(r): the ADC sum exactly
    return exact_scores(queries, x_hat, s.l2)


def _chunked(fn, args, chunk: int):
    """fn over chunks of `chunk` rows of every array in args (padded), concatenated back."""
    q = args[0].shape[0]
    pad = -q % chunk
    padded = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in args]
    out = lax.map(fn, tuple(a.reshape(-1, chunk, *a.shape[1:]) for a in padded))
    return tuple(o.reshape(-1, *o.shape[2:])[:q] for o in out)


@functools.partial(jax.jit, static_argnames=("s", "k"))
def search_all(parts: Parts, queries, *, s: Static, k: int):
    """(dists (q, k), rows (q, k)) over every row, scanning the database in blocks."""
    n = parts.data.shape[0]
    block = min(_BLOCK, max(n, 1))
    pad = -n % block
    data = jnp.pad(parts.data, ((0, pad), (0, 0))).reshape(-1, block, parts.data.shape[1])
    live = jnp.pad(parts.live, (0, pad)).reshape(-1, block)
    lists = jnp.pad(row_lists(parts.offsets, n), (0, pad)).reshape(-1, block)
    bias = None if parts.bias is None else jnp.pad(parts.bias, (0, pad)).reshape(-1, block)
    starts = jnp.arange(data.shape[0], dtype=jnp.int32) * block

    def one_chunk(args):
        (qs,) = args
        state = None
        if s.fast_scan:
            zero = jnp.zeros((1,), jnp.int32)
            state = jax.vmap(lambda q: probe_tables(parts, q, zero, s))(qs)

        def step(carry, blk):
            best_d, best_r = carry
            rows_data, rows_live, rows_list, rows_bias, start = blk
            scores = _score_block(parts, qs, rows_data, rows_list, state, s)
            if rows_bias is not None and s.fast_scan:  # decoded rows already hold ||x_hat||^2
                scores = scores + rows_bias[None, :]
            scores = jnp.where(rows_live[None, :], scores, jnp.inf)
            rows = jnp.broadcast_to(start + jnp.arange(block, dtype=jnp.int32), scores.shape)
            neg, pick = lax.top_k(-jnp.concatenate([best_d, scores], 1), k)
            return (-neg, jnp.take_along_axis(jnp.concatenate([best_r, rows], 1), pick, axis=1)), None

        init = (jnp.full((qs.shape[0], k), jnp.inf), jnp.full((qs.shape[0], k), -1, jnp.int32))
        (best_d, best_r), _ = lax.scan(step, init, (data, live, lists, bias, starts))
        return best_d, jnp.where(jnp.isfinite(best_d), best_r, -1)

    return _chunked(one_chunk, (queries,), min(_QUERY_CHUNK, queries.shape[0]))
