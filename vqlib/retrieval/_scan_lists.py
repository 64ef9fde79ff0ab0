"""The probed scan: each query reads the blocks of its nprobe nearest lists.

probe (the nearest coarse centroids) -> gather (the query's list blocks into a padded candidate
set of static size `budget` blocks) -> score -> top k. Table codebooks score through
`vqlib.kernels.adc_topk`: the tables of the P probed lists are laid side by side, (1, m, P k), and
a candidate of probe slot p has codes p k + code, so one table-lookup top-k serves every list.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from vqlib.kernels import adc_topk
from vqlib.retrieval._lists import BLOCK
from vqlib.retrieval._scoring import Parts, Static, codes_of, estimate_scores, exact_scores, probe_tables

_HIGHEST = lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames="nprobe")
def probe(centroids, queries, *, nprobe: int):
    """(q, nprobe) int32 nearest coarse centroids by L2 (faiss's IVF quantizer), nearest first."""
    scores = jnp.sum(centroids * centroids, axis=1)[None, :] - 2.0 * jnp.matmul(
        queries, centroids.T, precision=_HIGHEST
    )
    return lax.top_k(-scores, nprobe)[1].astype(jnp.int32)


def candidate_blocks(offsets, probes, budget: int):
    """Blocks of the probed lists of one query, padded: (blocks (budget,), probe slot, valid)."""
    first = offsets[probes] // BLOCK  # (P,)
    sizes = offsets[probes + 1] // BLOCK - first
    ends = jnp.cumsum(sizes)
    j = jnp.arange(budget, dtype=jnp.int32)
    slot = jnp.searchsorted(ends, j, side="right").astype(jnp.int32)
    valid = slot < probes.shape[0]
    slot = jnp.minimum(slot, probes.shape[0] - 1)
    blocks = first[slot] + j - (ends - sizes)[slot]
    return jnp.where(valid, blocks, 0), slot, valid


def _table_topk(parts: Parts, query, probes, rows, row_ids, slot, mask, s: Static, k: int):
    """Top k of one query's candidates by the probed lists' tables, through adc_topk."""
    tables, probe_bias, scale = probe_tables(parts, query, probes, s)  # (P, m, kc), (P,), ()
    p, m, kc = tables.shape
    codes = codes_of(rows, s).reshape(rows.shape[0], m)
    stacked = jnp.transpose(tables, (1, 0, 2)).reshape(1, m, p * kc)  # probe slot p: entries p kc ..
    bias = probe_bias[slot] if parts.bias is None else probe_bias[slot] + parts.bias[row_ids]
    bias = jnp.where(mask, bias * scale, jnp.inf)  # scores in table units: sum + scale * bias
    dists, best = adc_topk(stacked, slot[:, None] * kc + codes, k, bias=bias)
    return dists[0] / scale, best[0]


def query_batch(platform: str) -> int | None:
    """Queries the probed scan vectorises at a time (None: one by one). On an accelerator one
    query's scan is far too small a program: the H200 served 6-8k queries per second at every
    nprobe one by one (1M x 128 IVF-Flat; per-query overhead, not the scan). On CPU one at a time
    keeps each query's candidate set in cache; faiss serves the kinds it can hold anyway."""
    return None if platform == "cpu" else 64


@functools.partial(jax.jit, static_argnames=("s", "k", "budget", "batch"))
def search_probed(parts: Parts, queries, probes, *, s: Static, k: int, budget: int, batch: int | str | None = "auto"):
    """(dists (q, k), rows (q, k)) over the probed lists, reading `budget` blocks per query; rows
    are -1 where the lists hold fewer than k live rows. Per query (lax.map, `batch` queries
    vectorised at a time; None: one by one; "auto": `query_batch` of the device): its blocks are
    gathered whole (contiguous copies) and scored, then one top-k."""
    if batch == "auto":
        batch = query_batch(jax.default_backend())
    width = parts.data.shape[1]
    data = parts.data.reshape(-1, BLOCK, width)
    live = parts.live.reshape(-1, BLOCK)
    within = jnp.arange(BLOCK, dtype=jnp.int32)

    def one_query(args):
        query, probes_q = args
        blocks, slot, valid = candidate_blocks(parts.offsets, probes_q, budget)
        rows = data[blocks].reshape(-1, width)
        row_ids = (blocks[:, None] * BLOCK + within[None, :]).reshape(-1)
        row_slot = jnp.repeat(slot, BLOCK)
        mask = (live[blocks] & valid[:, None]).reshape(-1)
        if s.strategy == "tables":
            dists, best = _table_topk(parts, query, probes_q, rows, row_ids, row_slot, mask, s, k)
        else:
            if s.strategy == "raw":
                scores = exact_scores(query[None], rows, s.l2)[0]
            else:  # the estimator of each probed list's residuals: (P, C), then each row's own list
                ys = query[None, :] - parts.centroids[probes_q] if s.l2 else query[None, :]
                scores = estimate_scores(parts, ys, codes_of(rows, s), s)
                scores = jnp.take_along_axis(scores, row_slot[None, :], axis=0)[0] if s.l2 else scores[0]
                if not s.l2:
                    scores = scores - jnp.matmul(parts.centroids[probes_q], query, precision=_HIGHEST)[row_slot]
            neg, best = lax.top_k(-jnp.where(mask, scores, jnp.inf), k)
            dists = -neg
        return dists, jnp.where(jnp.isfinite(dists), row_ids[best], -1)

    return lax.map(one_query, (queries, probes), batch_size=batch)
