"""faiss-cpu as the CPU search engine of an index whose codebook faiss can hold.

XLA:CPU runs table lookups as generic gathers (about 1 ns each) where faiss's scanners run SIMD
loops over the same codes, so on CPU `search` hands raw-vector and PQ indexes (IVF or flat,
fast-scan included, OPQ in front) to a faiss copy of the index: the same coarse centroids,
codebook and codes, each vector labelled by its row (as `to_faiss(label_rows=True)`: results index
the raw vectors for re-ranking directly), built on first use and kept while the index lives. The
scores are the same ADC in float32, so results equal the XLA path's up to float rounding and the
order of equal scores (measured: 99.8-100% of top-10 ids equal, scores within 1e-4); L2 fast-scan
equals it where faiss's 8-bit table rounding matches vqlib's (flat for every metric, or one
probed list; with several lists faiss also rounds each list's offset: 99.5% equal ids). IVF
fast-scan with inner products goes through `search_preassigned`: vqlib's probes (nearest
centroids by L2) with <q, c> as each list's offset (faiss's own search would offset the lists by
its coarse quantizer's L2 distances); faiss rounds those offsets too (98-99% equal ids). Equal
scores come back lowest row first, as from XLA. Re-ranking is exact, on the host through faiss's
by-index distance loops (`rerank`).

Memory: the copy holds the index's rows once more (m bytes per vector for PQ, the vectors for
IVF-Flat). Other codebooks (RVQ, AQ, TurboQuant, RaBitQ, ...) and sharded indexes search with XLA.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from vqlib.codebooks import ProductCodebook
from vqlib.kernels import faiss_available
from vqlib.retrieval._faiss import faiss_copy
from vqlib.retrieval._index import Index

_MIRRORS: dict[int, tuple] = {}  # id(index) -> `_mirror`'s (copy, IVF part, coarse centroids)
_LOCK = threading.Lock()


def can_serve(index: Index) -> bool:
    """Whether the faiss engine can search `index` (faiss installed, a codebook faiss holds)."""
    if not faiss_available():
        return False
    if index.codebook is not None and not isinstance(index.codebook, ProductCodebook):
        return False
    # faiss's SIMD table code asserts ksub % 8 == 0 (seen with 2 dimensions per subspace)
    return index.codebook is None or index.codebook.centroids.shape[-2] % 8 == 0


def _preassigned(index: Index) -> bool:
    """IVF fast-scan with inner products: searched with vqlib's probes and list offsets."""
    return index.fast_scan and index.nlist > 1 and index.metric != "l2"


def _mirror(index: Index):
    """(faiss copy, its IVF part or None, coarse centroids as the IVF part sees them or None)."""
    key = id(index)
    with _LOCK:
        found = _MIRRORS.get(key)
        if found is not None:
            return found
    import faiss

    copy = faiss_copy(index, label_rows=True)
    ivf = faiss.try_extract_index_ivf(copy)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist) if _preassigned(index) else None
    entry = (copy, ivf, centroids)
    with _LOCK:
        _MIRRORS[key] = entry
    weakref.finalize(index, _MIRRORS.pop, key, None)
    return entry


def search(index: Index, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores (q, k) float32, rows (q, k) int64 of `index.data`, -1: none) from the faiss copy,
    equal scores lowest row first."""
    copy, ivf, centroids = _mirror(index)
    queries = np.ascontiguousarray(queries, np.float32)
    larger_better = index.metric != "l2"
    with _LOCK:  # nprobe is a field of the shared copy
        if ivf is not None:
            ivf.nprobe = nprobe
        run = _searcher(copy, ivf, centroids, queries, nprobe)
        if not index.fast_scan:
            return _ties_to_lowest_row(*run(slice(None), k), larger_better=larger_better)
        # fast-scan's integer scores tie often, also at the k-th place, where faiss keeps the
        # highest rows of a tie: k more results settle most such ties (measured: 0.8x faiss's QPS
        # against 0.6x for fetching k + 1 and searching the tied queries again); the queries whose
        # tie runs past them are searched again, deeper, until it ends
        fetch = min(2 * k, copy.ntotal)
        scores, rows = _ties_to_lowest_row(*run(slice(None), fetch), larger_better=larger_better)
        top_scores, top_rows = scores[:, :k].copy(), rows[:, :k].copy()
        open_ = np.flatnonzero(_tie_runs_past(scores, rows, k)) if fetch > k else np.zeros(0, np.int64)
        while open_.size and fetch < copy.ntotal:
            fetch = min(2 * fetch, copy.ntotal)
            scores, rows = _ties_to_lowest_row(*run(open_, fetch), larger_better=larger_better)
            top_scores[open_], top_rows[open_] = scores[:, :k], rows[:, :k]
            open_ = open_[_tie_runs_past(scores, rows, k)]
    return top_scores, top_rows


def rerank(index: Index, queries: np.ndarray, rows: np.ndarray, *, l2: bool, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`rerank_exact` on the host: the exact scores of the candidate rows (q, R) (-1: none) by
    faiss's `fvec_L2sqr_by_idx` / `fvec_inner_products_by_idx` over the index's raw vectors (read
    in place, no copy), the best k by a stable sort (equal scores: the earlier candidate, as
    `lax.top_k`). 2.1 against 18.2 ms for 1,000 x 100 candidates of d = 128 in 1M vectors (AMD
    EPYC, 2 cores). Returns (dists (q, k) float32, squared distances or minus inner products;
    rows (q, k) int64, -1 where fewer than k candidates)."""
    import faiss

    # every array faiss reads through a raw pointer is held by a name for the whole call
    vectors = np.ascontiguousarray(np.asarray(index.vectors), np.float32)  # a view of the buffer on CPU
    queries = np.ascontiguousarray(queries, np.float32)
    rows = np.ascontiguousarray(rows, np.int64)
    if rows.size and int(rows.max()) >= vectors.shape[0]:  # faiss would read past the vectors
        raise ValueError(f"candidate rows must be < {vectors.shape[0]} (the index's rows), got {int(rows.max())}")
    q, r = rows.shape
    scores = np.empty((q, r), np.float32)
    by_idx = faiss.fvec_L2sqr_by_idx if l2 else faiss.fvec_inner_products_by_idx
    ptr = faiss.swig_ptr
    by_idx(ptr(scores), ptr(queries), ptr(vectors), ptr(rows), vectors.shape[1], q, r)
    if not l2:
        np.negative(scores, out=scores)
    scores[rows < 0] = np.inf  # faiss skips them; never a result
    pick = np.argsort(scores, axis=1, kind="stable")[:, :k]
    dists = np.take_along_axis(scores, pick, 1)
    return dists, np.where(np.isfinite(dists), np.take_along_axis(rows, pick, 1), -1)


def _tie_runs_past(scores: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """(q,) bool: the k-th result ties with the last one fetched (a real result), so rows beyond
    the fetch might belong to the tie."""
    return (rows[:, -1] >= 0) & (scores[:, -1] == scores[:, k - 1])


def _searcher(copy, ivf, centroids, queries: np.ndarray, nprobe: int):
    """`run(picked, k)`: the faiss copy's top k of queries[picked] (an index array or a slice).
    IVF inner products: each query's nprobe nearest lists by L2 (as vqlib probes) with <q, c> as
    the list's offset, through faiss's search_preassigned; the queries pass the copy's OPQ
    rotation first, as its IVF part sees them."""
    if centroids is None:
        return lambda picked, k: copy.search(np.ascontiguousarray(queries[picked]), k)
    import faiss

    rotated = copy.chain.at(0).apply(queries) if isinstance(copy, faiss.IndexPreTransform) else queries  # OPQ
    _, probes = ivf.quantizer.search(rotated, nprobe)
    offsets = np.einsum("qd,qpd->qp", rotated, centroids[probes]).astype(np.float32)

    def run(picked, k: int):
        q, p, o = (np.ascontiguousarray(a[picked]) for a in (rotated, probes, offsets))
        return ivf.search_preassigned(q, k, p, o)

    return run


def _ties_to_lowest_row(scores: np.ndarray, rows: np.ndarray, *, larger_better: bool):
    """Each query's results in vqlib's order: by score, equal scores by row (faiss's heaps leave
    equal inner products highest row first); missing results (-1) stay last. faiss returns them
    sorted by score, so only the queries with a tie are sorted again."""
    rows = rows.astype(np.int64, copy=False)
    tied = np.flatnonzero((scores[:, 1:] == scores[:, :-1]).any(axis=1))
    if tied.size == 0:
        return scores, rows
    scores, rows = scores.copy(), rows.copy()
    key = -scores[tied] if larger_better else scores[tied]
    order = np.lexsort((np.where(rows[tied] < 0, np.iinfo(np.int64).max, rows[tied]), key), axis=-1)
    scores[tied] = np.take_along_axis(scores[tied], order, -1)
    rows[tied] = np.take_along_axis(rows[tied], order, -1)
    return scores, rows


def ids_of(index: Index, rows: np.ndarray) -> np.ndarray:
    """Rows of `index.data` (-1: none) -> the vectors' ids (-1: none)."""
    return np.where(rows >= 0, index.ids[np.maximum(rows, 0)], -1)
