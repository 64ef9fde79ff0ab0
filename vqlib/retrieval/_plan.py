"""Which scan a search runs, its arguments checked, and its results turned into the public form."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vqlib import _checks
from vqlib.retrieval._index import Index, prepare
from vqlib.retrieval._lists import BLOCK
from vqlib.retrieval._scan_full import search_all
from vqlib.retrieval._scan_lists import probe, search_probed
from vqlib.retrieval._scoring import Parts, Static, static_of, to_public


def round_budget(count: int) -> int:
    """`count` rounded up to 1, 1.25, 1.5 or 1.75 times a power of two (few compiled sizes)."""
    if count <= 16:
        return max(count, 1)
    step = 2 ** (count.bit_length() - 3)
    return -(-count // step) * step


def full_scan(index: Index, nprobe: int) -> bool:
    """Whether a search scans all rows: the flat indexes, or every list probed when the rows score
    without per-list tables (raw rows, or table codes decoded; not fast-scan's integer tables)."""
    s = static_of(index)
    return index.nlist == 1 or (nprobe == index.nlist and s.strategy != "estimate" and not s.fast_scan)


def check_search(index: Index, queries, k, nprobe, rerank, *, live: int | None = None):
    """Validated (queries float32 (q, d), k, nprobe, rerank or None); `live` overrides index.ntotal."""
    if not isinstance(index, Index):
        raise TypeError(f"index must be a vqlib.retrieval.Index, got {type(index).__name__}")
    queries = prepare(queries, index.metric, "queries")
    _checks.check_dim(queries, index.dim, "queries", "the index was built for")
    live = index.ntotal if live is None else live
    if live == 0:
        raise ValueError("the index is empty; add vectors with vqlib.retrieval.add before searching")
    k = _checks.check_int(k, "k", low=1)
    if k > live:
        raise ValueError(f"k={k} is larger than the {live} vectors in the index; ask for at most {live}")
    nprobe = _checks.check_int(nprobe, "nprobe", low=1)
    if nprobe > index.nlist:
        raise ValueError(f"nprobe={nprobe} exceeds nlist={index.nlist}; use nprobe <= {index.nlist}")
    if rerank is not None:
        rerank = _checks.check_int(rerank, "rerank", low=k)
        if index.vectors is None:
            raise ValueError("rerank needs the raw vectors: build the index with keep_vectors=True")
    return queries, k, nprobe, rerank


def probed_blocks(offsets, probes) -> np.ndarray:
    """(q,) blocks each query's probed lists hold; offsets (nlist + 1,) or stacked per shard
    (S, nlist + 1), then the largest over the shards."""
    sizes = np.diff(np.asarray(offsets), axis=-1).reshape(-1, np.shape(offsets)[-1] - 1) // BLOCK
    return sizes[:, np.asarray(probes)].sum(-1).max(0)


def approximate(parts: Parts, queries, s: Static, *, k: int, nprobe: int, full: bool, probes=None, budget=None):
    """Top-k rows of one index (or shard) by its scores. Probed searches group the queries by how
    many blocks their lists hold, one compiled call per rounded size, unless a `budget` (blocks
    per query) is given; `probes` (q, nprobe) saves the coarse search."""
    if full:
        return search_all(parts, queries, s=s, k=k)
    probes = probe(parts.centroids, queries, nprobe=nprobe) if probes is None else probes
    least = -(-k // BLOCK)
    if budget is not None:
        return search_probed(parts, queries, probes, s=s, k=k, budget=max(budget, least))
    need = np.array([round_budget(max(int(t), least)) for t in probed_blocks(parts.offsets, probes)])
    dists = np.empty((queries.shape[0], k), np.float32)
    rows = np.empty((queries.shape[0], k), np.int32)
    for size in np.unique(need):
        pick = np.flatnonzero(need == size)
        got = search_probed(parts, queries[pick], probes[pick], s=s, k=k, budget=int(size))
        dists[pick], rows[pick] = (np.asarray(a) for a in got)
    return jnp.asarray(dists), jnp.asarray(rows)


def finish(index: Index, dists, rows, ids: np.ndarray):
    """Internal (smaller-is-better, row) results -> public (scores, int64 ids); -1 ids and
    inf / -inf scores where fewer than k vectors were found."""
    rows = np.asarray(rows)
    dists = np.asarray(dists, np.float32)
    out_ids = np.where(rows >= 0, ids[np.maximum(rows, 0)], -1).astype(np.int64)
    scores = np.array(to_public(index, dists), np.float32)
    missing = rows < 0
    scores[missing] = np.inf if index.metric == "l2" else -np.inf
    return scores, out_ids
