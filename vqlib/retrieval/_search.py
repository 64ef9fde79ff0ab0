"""The public search: probe -> gather -> score (tables through `adc_topk`, or the codebook's
estimator) -> top k -> optional exact re-ranking (see `_scan_full`, `_scan_lists`, `_rerank`)."""

from __future__ import annotations

import numpy as np
from jaxtyping import ArrayLike, Float, Float32, Int64

from vqlib.retrieval._index import Index
from vqlib.retrieval._plan import approximate, check_search, finish, full_scan
from vqlib.retrieval._rerank import rerank_exact
from vqlib.retrieval._scoring import parts_of, static_of
from vqlib.retrieval._shard import ShardedIndex, search_sharded


def search(
    index: Index | ShardedIndex,
    queries: Float[ArrayLike, "q d"],
    k: int = 10,
    *,
    nprobe: int = 1,
    rerank: int | None = None,
) -> tuple[Float32[np.ndarray, "q {k}"], Int64[np.ndarray, "q {k}"]]:
    """The k best vectors of the index for each query.

    Args:
        index: an Index from `build` / `add` (or a sharded one from `shard`).
        queries: (q, d) float vectors, finite.
        k: results per query, at most the number of live vectors.
        nprobe: lists probed per query (1 <= nprobe <= nlist; faiss's default, 1).
        rerank: re-score this many best candidates (>= k) exactly with the raw vectors
            (needs keep_vectors=True), then keep k.

    Returns:
        scores (q, k) float32 (squared L2 distances ascending, or inner products / cosines
        descending) and ids (q, k) int64; -1 ids (and inf / -inf scores) where the probed lists
        hold fewer than k live vectors.

    Example:
        >>> import numpy as np, vqlib
        >>> x = np.random.default_rng(0).normal(size=(500, 8)).astype("float32")
        >>> index = vqlib.retrieval.build(x, "flat")
        >>> vqlib.retrieval.search(index, x[3:4], k=1)[1].tolist()
        [[3]]
    """
    if isinstance(index, ShardedIndex):
        return search_sharded(index, queries, k, nprobe=nprobe, rerank=rerank)
    queries, k, nprobe, rerank = check_search(index, queries, k, nprobe, rerank)
    if queries.shape[0] == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    s = static_of(index)
    dists, rows = approximate(parts_of(index), queries, s, k=rerank or k, nprobe=nprobe, full=full_scan(index, nprobe))
    if rerank is not None:
        dists, rows = rerank_exact(index.vectors, queries, rows, l2=s.l2, k=k)
    return finish(index, dists, rows, index.ids)
