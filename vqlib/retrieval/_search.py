"""The public search: probe -> gather -> score (tables through `adc_topk`, or the codebook's
estimator) -> top k -> optional exact re-ranking (see `_scan_full`, `_scan_lists`, `_rerank`), run
by XLA, or on CPU by faiss for the indexes it can hold (`_faiss_engine`).

Inside a user's `jax.jit` (traced queries, a concrete index) the same search runs traced: the
probed scan reads a fixed candidate budget (the nprobe largest lists), the faiss engine is called
through `jax.pure_callback`, and ids come back as int32 (JAX's default integer width).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float, Float32, Int64

from vqlib import _checks
from vqlib.retrieval import _faiss_engine
from vqlib.retrieval._index import Index
from vqlib.retrieval._lists import BLOCK
from vqlib.retrieval._plan import approximate, check_search, finish, full_scan, round_budget
from vqlib.retrieval._rerank import rerank_exact
from vqlib.retrieval._scan_full import search_all
from vqlib.retrieval._scan_lists import probe, search_probed
from vqlib.retrieval._scoring import parts_of, static_of, to_public
from vqlib.retrieval._shard import ShardedIndex, search_sharded

IMPLS = ("auto", "xla", "faiss")


def search(
    index: Index | ShardedIndex,
    queries: Float[ArrayLike, "q d"],
    k: int = 10,
    *,
    nprobe: int = 1,
    rerank: int | None = None,
    impl: str = "auto",
) -> tuple[Float32[np.ndarray, "q {k}"], Int64[np.ndarray, "q {k}"]]:
    """The k best vectors of the index for each query.

    Args:
        index: an Index from `build` / `add` (or a sharded one from `shard`).
        queries: (q, d) float vectors, finite.
        k: results per query, at most the number of live vectors.
        nprobe: lists probed per query (1 <= nprobe <= nlist; faiss's default, 1).
        rerank: re-score this many best candidates (>= k) exactly with the raw vectors
            (needs keep_vectors=True), then keep k.
        impl: "auto" (on CPU, faiss for raw-vector and PQ indexes when faiss-cpu is installed;
            XLA otherwise), "xla" or "faiss" (raises when faiss cannot hold the index).

    Returns:
        scores (q, k) float32 (squared L2 distances ascending, or inner products / cosines
        descending) and ids (q, k) int64; -1 ids (and inf / -inf scores) where the probed lists
        hold fewer than k live vectors. Under jit: jax arrays, ids int32.

    Example:
        >>> import numpy as np, vqlib
        >>> x = np.random.default_rng(0).normal(size=(500, 8)).astype("float32")
        >>> index = vqlib.retrieval.build(x, "flat")
        >>> vqlib.retrieval.search(index, x[3:4], k=1)[1].tolist()
        [[3]]
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if isinstance(index, ShardedIndex):
        if impl == "faiss":
            raise ValueError("a sharded index searches with XLA on its devices; use impl='auto' or 'xla'")
        return search_sharded(index, queries, k, nprobe=nprobe, rerank=rerank)
    queries, k, nprobe, rerank = check_search(index, queries, k, nprobe, rerank)
    use_faiss = _use_faiss(index, impl)
    if not _checks.is_concrete(queries):
        return _search_traced(index, queries, k, nprobe, rerank, use_faiss)
    if queries.shape[0] == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    s = static_of(index)
    if use_faiss:
        scores, rows = _faiss_engine.search(index, np.asarray(queries), rerank or k, nprobe)
        if rerank is None:
            return _faiss_public(index, scores, _faiss_engine.ids_of(index, rows))
        dists, rows = _faiss_engine.rerank(index, np.asarray(queries), rows, l2=s.l2, k=k)
        return finish(index, dists, rows, index.ids)
    dists, rows = approximate(parts_of(index), queries, s, k=rerank or k, nprobe=nprobe, full=full_scan(index, nprobe))
    if rerank is not None:
        dists, rows = rerank_exact(index.vectors, queries, rows, l2=s.l2, k=k)
    return finish(index, dists, rows, index.ids)


def _use_faiss(index: Index, impl: str) -> bool:
    if impl == "faiss":
        if not _faiss_engine.can_serve(index):
            raise ValueError(
                f"impl='faiss' cannot search this index ({index.kind}, metric {index.metric}): faiss-cpu holds raw "
                "and PQ indexes of 8k centroids per subspace; "
                "use impl='xla' or 'auto'"
            )
        return True
    return impl == "auto" and jax.default_backend() == "cpu" and _faiss_engine.can_serve(index)


def _faiss_public(index: Index, scores, ids):
    """faiss's (scores, ids) in vqlib's convention: inf / -inf where no vector was found."""
    scores = np.array(scores, np.float32)
    scores[ids < 0] = np.inf if index.metric == "l2" else -np.inf
    return scores, ids


def _budget(index: Index, nprobe: int) -> int:
    """Blocks the nprobe largest lists hold: a candidate budget that fits every query."""
    sizes = np.sort(np.diff(np.asarray(index.offsets)) // BLOCK)[::-1]
    return round_budget(max(int(sizes[:nprobe].sum()), 1))


def _search_traced(index: Index, queries, k: int, nprobe: int, rerank, use_faiss: bool):
    """`search` with traced queries (inside a user's jit): jax arrays out, ids int32."""
    s = static_of(index)
    kk = rerank or k
    if use_faiss:

        def host(q):
            scores, rows = _faiss_engine.search(index, np.asarray(q), kk, nprobe)
            internal = scores if s.l2 or index.metric == "l2" else -scores
            return internal.astype(np.float32), rows.astype(np.int32)

        shapes = (
            jax.ShapeDtypeStruct((queries.shape[0], kk), jnp.float32),
            jax.ShapeDtypeStruct((queries.shape[0], kk), jnp.int32),
        )
        dists, rows = jax.pure_callback(host, shapes, queries, vmap_method="sequential")
    elif full_scan(index, nprobe):
        dists, rows = search_all(parts_of(index), queries, s=s, k=kk)
    else:
        probes = probe(index.centroids, queries, nprobe=nprobe)
        dists, rows = search_probed(parts_of(index), queries, probes, s=s, k=kk, budget=_budget(index, nprobe))
    if rerank is not None:
        dists, rows = rerank_exact(index.vectors, queries, rows, l2=s.l2, k=k)
    if index.ids.size and int(index.ids.max()) >= 2**31:
        raise ValueError("ids beyond int32 cannot be returned inside jit; search outside jit for int64 ids")
    ids = jnp.where(rows >= 0, jnp.asarray(index.ids, jnp.int32)[jnp.maximum(rows, 0)], -1)
    scores = to_public(index, dists)
    missing = jnp.inf if index.metric == "l2" else -jnp.inf
    return jnp.where(rows >= 0, scores, missing), ids
