"""faiss interop: import a trained faiss index (codebooks and lists) and export back.

Supported both ways: IndexFlatL2 / IndexFlatIP ("flat"), IndexIVFFlat ("ivfflat"), IndexPQ
("pq"), IndexIVFPQ with by_residual ("ivfpq"), and either PQ wrapped in an IndexPreTransform
with an OPQMatrix (OPQ). Exported PQ kinds with 4-bit codes become faiss's fast-scan indexes
("pqfs" -> IndexPQFastScan, "ivfpqfs" -> IndexIVFPQFastScan). Ids travel with the vectors
(flat and PQ indexes are wrapped in IndexIDMap2 on export). "tq" has no faiss counterpart and
"rabitq" is not exported (faiss's IndexRaBitQ stores its factors differently), and
faiss has no cosine metric: a "cos" index exports as inner product over its unit vectors, so
normalise the queries before searching it in faiss.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vqlib.codebooks._product import ProductCodebook
from vqlib.retrieval._index import Index, block_layout, row_lists, take_rows


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("faiss interop needs faiss-cpu: pip install faiss-cpu") from e
    return faiss


def _metric(faiss, index) -> str:
    if index.metric_type == faiss.METRIC_L2:
        return "l2"
    if index.metric_type == faiss.METRIC_INNER_PRODUCT:
        return "ip"
    raise ValueError(f"faiss metric_type {index.metric_type} has no vqlib counterpart (l2 or inner product)")


def _pq_centroids(faiss, pq) -> np.ndarray:
    return faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)


def _lists(faiss, ivf):
    """(codes (n, code_size) uint8, ids (n,) int64, lists (n,)) of every inverted list."""
    codes, ids, lists = [], [], []
    inv = ivf.invlists
    for lst in range(ivf.nlist):
        size = inv.list_size(lst)
        if size == 0:
            continue
        codes.append(np.array(faiss.rev_swig_ptr(inv.get_codes(lst), size * inv.code_size)).reshape(size, -1))
        ids.append(np.array(faiss.rev_swig_ptr(inv.get_ids(lst), size)).astype(np.int64))
        lists.append(np.full(size, lst, np.int64))
    if not codes:
        return np.zeros((0, inv.code_size), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(codes), np.concatenate(ids), np.concatenate(lists)


def _assemble(kind, metric, centroids, codebook, data, ids, lists, nbits) -> Index:
    source, offsets = block_layout(lists, centroids.shape[0])
    live = np.ones(len(ids), bool)
    return Index(
        centroids=jnp.asarray(centroids, jnp.float32),
        codebook=codebook,
        data=jnp.asarray(take_rows(data, source)),
        offsets=jnp.asarray(offsets),
        ids=take_rows(ids, source, -1),
        live=jnp.asarray(take_rows(live, source, False)),
        vectors=None,
        kind=kind,
        metric=metric,
        nbits=nbits,
    )


def from_faiss(index) -> Index:
    """A vqlib Index holding a trained faiss index's quantizers and vectors (see module doc).

    Example:
        >>> import faiss, numpy as np, vqlib
        >>> x = np.random.default_rng(0).normal(size=(500, 8)).astype("float32")
        >>> flat = faiss.IndexFlatL2(8); flat.add(x)
        >>> vqlib.retrieval.search(vqlib.retrieval.from_faiss(flat), x[:2], k=1)[1].tolist()
        [[0], [1]]
    """
    faiss = _faiss()
    rotation = None
    if isinstance(index, faiss.IndexPreTransform):
        if index.chain.size() != 1 or not isinstance(
            faiss.downcast_VectorTransform(index.chain.at(0)), faiss.OPQMatrix
        ):
            raise ValueError("only an IndexPreTransform with a single OPQMatrix can be imported")
        opq = faiss.downcast_VectorTransform(index.chain.at(0))
        rotation = jnp.asarray(faiss.vector_to_array(opq.A).reshape(opq.d_out, opq.d_in).T)
        index = faiss.downcast_index(index.index)
    ids = None
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        index = faiss.downcast_index(index.index)
    metric, d = _metric(faiss, index), index.d
    ids = np.arange(index.ntotal, dtype=np.int64) if ids is None else ids
    if not index.is_trained:
        raise ValueError("the faiss index is not trained; train it (index.train(x)) before importing")
    zero = np.zeros((1, d), np.float32)
    if rotation is not None and not isinstance(index, (faiss.IndexPQ, faiss.IndexIVFPQ)):
        raise ValueError("an OPQ transform can be imported in front of IndexPQ or IndexIVFPQ only")
    if isinstance(index, faiss.IndexFlat):
        vectors = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, d), np.float32)
        return _assemble("flat", metric, zero, None, vectors, ids, np.zeros(len(ids), np.int64), 0)
    if isinstance(index, faiss.IndexPQ):
        pq = index.pq
        codebook = ProductCodebook(jnp.asarray(_pq_centroids(faiss, pq)), rotation)
        codes = faiss.vector_to_array(index.codes).reshape(index.ntotal, pq.code_size)
        return _assemble("pq", metric, zero, codebook, codes, ids, np.zeros(len(ids), np.int64), pq.nbits)
    if isinstance(index, (faiss.IndexIVFFlat, faiss.IndexIVFPQ)):
        centroids = index.quantizer.reconstruct_n(0, index.nlist)
        codes, list_ids, lists = _lists(faiss, index)
        if isinstance(index, faiss.IndexIVFFlat):
            return _assemble("ivfflat", metric, centroids, None, codes.view(np.float32), list_ids, lists, 0)
        if not index.by_residual:
            raise ValueError("IndexIVFPQ with by_residual=False is not supported; vqlib codes residuals")
        codebook = ProductCodebook(jnp.asarray(_pq_centroids(faiss, index.pq)), rotation)
        if rotation is not None:  # faiss rotates before the coarse quantizer: c = c' R^T
            centroids = np.asarray(centroids @ np.asarray(rotation).T, np.float32)
        return _assemble("ivfpq", metric, centroids, codebook, codes, list_ids, lists, index.pq.nbits)
    raise ValueError(
        f"cannot import a faiss {type(index).__name__}; supported: IndexFlat, IndexIVFFlat, IndexPQ, "
        "IndexIVFPQ (optionally behind IndexIDMap or an OPQMatrix)"
    )


def to_faiss(index: Index):
    """A faiss index with the same quantizers and live vectors (see module doc for the kinds).

    Example:
        >>> import numpy as np, vqlib
        >>> x = np.random.default_rng(0).normal(size=(500, 8)).astype("float32")
        >>> exported = vqlib.retrieval.to_faiss(vqlib.retrieval.build(x, "flat"))
        >>> exported.search(x[:2], 1)[1].tolist()
        [[0], [1]]
    """
    faiss = _faiss()
    if not isinstance(index, Index):
        raise TypeError(f"index must be a vqlib.retrieval.Index, got {type(index).__name__}")
    if index.kind in ("tq", "rabitq"):
        raise ValueError(f"a {index.kind!r} index cannot be exported to faiss; export a flat, ivfflat or PQ kind")
    d = index.dim
    metric = faiss.METRIC_L2 if index.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    keep = np.flatnonzero(np.asarray(index.live))
    data, ids = np.asarray(index.data)[keep], index.ids[keep]
    lists = np.asarray(row_lists(index.offsets, index.data.shape[0]))[keep]
    cb = index.codebook
    if index.kind in ("flat", "ivfflat"):
        if index.kind == "flat":
            out = faiss.IndexFlat(d, metric)
            wrapped = _with_ids(faiss, out, ids)
            out.add(data)
            return _set_ids(faiss, wrapped, ids)
        out = faiss.IndexIVFFlat(_coarse(faiss, index), d, index.nlist, metric)
    else:
        m, k, _ = cb.centroids.shape
        if index.kind in ("pq", "pqfs"):
            out = faiss.IndexPQ(d, m, index.nbits, metric)
        else:
            out = faiss.IndexIVFPQ(_coarse(faiss, index), d, index.nlist, m, index.nbits, metric)
            out.by_residual = True
        faiss.copy_array_to_vector(np.asarray(cb.centroids, np.float32).ravel(), out.pq.centroids)
        out.is_trained = True
        if index.kind in ("pq", "pqfs"):
            faiss.copy_array_to_vector(data.ravel(), out.codes)
            out.ntotal = len(keep)
            if index.kind == "pqfs":
                fast = faiss.IndexPQFastScan(out)
                fast.__dict__["_vqlib_inner"] = out
                out = fast
            codes, out.ntotal = out, 0  # IndexIDMap2 wraps an empty index only
            wrapped = _with_ids(faiss, out, ids)
            codes.ntotal = len(keep)
            return _with_opq(faiss, _set_ids(faiss, wrapped, ids), cb)
    out.is_trained = True
    if isinstance(out, faiss.IndexIVFPQ):
        out.precompute_table()
    for lst in np.unique(lists):
        rows = np.flatnonzero(lists == lst)
        list_ids = np.ascontiguousarray(ids[rows])  # held in locals: swig_ptr does not keep them alive
        list_codes = np.ascontiguousarray(data[rows]).view(np.uint8)
        out.invlists.add_entries(int(lst), rows.size, faiss.swig_ptr(list_ids), faiss.swig_ptr(list_codes))
    out.ntotal = len(keep)
    if index.kind == "ivfpqfs":
        fast = faiss.IndexIVFPQFastScan(out)
        fast.__dict__["_vqlib_inner"] = out
        out = fast
    return _with_opq(faiss, out, cb)


def _coarse(faiss, index: Index):
    """faiss's coarse quantizer; behind an OPQ transform it sees rotated vectors: c' = c R."""
    centroids = np.asarray(index.centroids, np.float32)
    if index.codebook is not None and index.codebook.rotation is not None:
        centroids = centroids @ np.asarray(index.codebook.rotation, np.float32)
    quantizer = faiss.IndexFlatL2(index.dim)
    quantizer.add(np.ascontiguousarray(centroids))
    return quantizer


def _with_ids(faiss, out, ids: np.ndarray):
    """`out` (still empty), wrapped in an IndexIDMap2 unless the ids are 0 .. n-1."""
    if np.array_equal(ids, np.arange(len(ids))):
        return out
    wrapped = faiss.IndexIDMap2(out)
    wrapped.__dict__["_vqlib_inner"] = out  # keep the wrapped index alive with the wrapper
    return wrapped


def _set_ids(faiss, wrapped, ids: np.ndarray):
    """Fills the id map of a wrapper from `_with_ids` once its index holds the vectors."""
    if not hasattr(wrapped, "id_map"):
        return wrapped
    faiss.copy_array_to_vector(ids.astype(np.int64), wrapped.id_map)
    wrapped.ntotal = len(ids)
    wrapped.construct_rev_map()
    return wrapped


def _with_opq(faiss, out, cb):
    if cb is None or cb.rotation is None:
        return out
    d = cb.rotation.shape[0]
    opq = faiss.OPQMatrix(d, cb.centroids.shape[0])
    faiss.copy_array_to_vector(np.asarray(cb.rotation, np.float32).T.ravel(), opq.A)
    opq.is_trained = True
    opq.is_orthonormal = True
    wrapped = faiss.IndexPreTransform(opq, out)
    wrapped.__dict__["_vqlib_inner"] = (out, opq)
    return wrapped
