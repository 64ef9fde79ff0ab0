"""faiss interop: import a trained faiss index (quantizers and lists) and export back.

faiss types map to codebooks, both ways: IndexFlatL2 / IndexFlatIP and IndexIVFFlat hold raw
vectors (no codebook); IndexPQ and IndexIVFPQ (by_residual) a `ProductCodebook`, with its OPQ
rotation when the index sits behind an IndexPreTransform with one OPQMatrix. An exported PQ
index with `fast_scan` becomes IndexPQFastScan / IndexIVFPQFastScan. Ids travel with the vectors
(flat and PQ indexes are wrapped in IndexIDMap2 on export). Other codebooks (RVQ, AQ, TurboQuant,
RaBitQ, ...) have no faiss form here: export refuses them. faiss has no cosine metric: a "cos"
index exports as inner product over its unit vectors, so normalise the queries before searching
it in faiss.

vqlib probes lists by L2 distance to the coarse centroids. An IVF index whose coarse quantizer
ranks by inner product is imported only when its centroids have unit length (then both rankings
agree); IVF fast-scan with "ip" / "cos" is not exported, because faiss's IndexIVFPQFastScan takes
each list's inner-product offset from its coarse quantizer's L2 distances.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from vqlib.codebooks import ProductCodebook, Rotation, code_layout, rotate
from vqlib.retrieval._index import Index, empty_index
from vqlib.retrieval._lists import block_layout, row_lists, take_rows


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


def _assemble(metric, centroids, codebook, data, ids, lists, fast_scan=False) -> Index:
    empty = empty_index(
        jnp.asarray(centroids, jnp.float32), codebook, metric, fast_scan, False, "flat" if codebook is None else "pq"
    )
    source, offsets = block_layout(lists, centroids.shape[0])
    live = np.ones(len(ids), bool)
    return dataclasses.replace(
        empty,
        data=jnp.asarray(take_rows(data, source)),
        offsets=jnp.asarray(offsets),
        ids=take_rows(ids, source, -1),
        live=jnp.asarray(take_rows(live, source, False)),
    )


def _coarse_centroids(faiss, index) -> np.ndarray:
    """The IVF centroids; a coarse quantizer ranking by inner product must have unit centroids."""
    centroids = index.quantizer.reconstruct_n(0, index.nlist)
    if index.quantizer.metric_type != faiss.METRIC_L2:
        norms = np.linalg.norm(centroids, axis=1)
        if not np.allclose(norms, 1.0, atol=1e-4):
            raise ValueError(
                "the faiss index's coarse quantizer ranks lists by inner product and its centroids are not "
                f"unit vectors (norms {norms.min():.3g} to {norms.max():.3g}); vqlib probes by L2 distance, which "
                "ranks lists differently: rebuild the faiss index with an IndexFlatL2 quantizer"
            )
    return centroids


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
        a = faiss.vector_to_array(opq.A).reshape(opq.d_out, opq.d_in)  # y = A x
        rotation = Rotation(jnp.ones((opq.d_in,), jnp.float32), jnp.asarray(a, jnp.float32))
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
        return _assemble(metric, zero, None, vectors, ids, np.zeros(len(ids), np.int64))
    if isinstance(index, faiss.IndexPQ):
        pq = index.pq
        codebook = ProductCodebook(jnp.asarray(_pq_centroids(faiss, pq)), rotation)
        codes = faiss.vector_to_array(index.codes).reshape(index.ntotal, pq.code_size)
        return _assemble(metric, zero, codebook, codes, ids, np.zeros(len(ids), np.int64))
    if isinstance(index, (faiss.IndexIVFFlat, faiss.IndexIVFPQ)):
        centroids = _coarse_centroids(faiss, index)
        codes, list_ids, lists = _lists(faiss, index)
        if isinstance(index, faiss.IndexIVFFlat):
            return _assemble(metric, centroids, None, codes.view(np.float32), list_ids, lists)
        if not index.by_residual:
            raise ValueError("IndexIVFPQ with by_residual=False is not supported; vqlib codes residuals")
        codebook = ProductCodebook(jnp.asarray(_pq_centroids(faiss, index.pq)), rotation)
        if rotation is not None:  # faiss rotates before the coarse quantizer: c = c' R^T
            centroids = np.asarray(centroids @ np.asarray(rotation.factor), np.float32)
        return _assemble(metric, centroids, codebook, codes, list_ids, lists)
    raise ValueError(
        f"cannot import a faiss {type(index).__name__}; supported: IndexFlat, IndexIVFFlat, IndexPQ, "
        "IndexIVFPQ (optionally behind IndexIDMap or an OPQMatrix)"
    )


def to_faiss(index: Index, *, label_rows: bool = False):
    """A faiss index with the same quantizers and live vectors (see module doc for the kinds).

    Args:
        index: the vqlib index.
        label_rows: label each vector by its row in `index.data` instead of its id (the search
            engine's copy: its results index the raw vectors directly, and a flat copy needs no
            id map).

    Example:
        >>> import numpy as np, vqlib
        >>> x = np.random.default_rng(0).normal(size=(500, 8)).astype("float32")
        >>> exported = vqlib.retrieval.to_faiss(vqlib.retrieval.build(x, "flat"))
        >>> exported.search(x[:2], 1)[1].tolist()
        [[0], [1]]
    """
    _faiss()  # a clear error first where faiss-cpu is missing
    if not isinstance(index, Index):
        raise TypeError(f"index must be a vqlib.retrieval.Index, got {type(index).__name__}")
    cb = index.codebook
    if cb is not None and not isinstance(cb, ProductCodebook):
        raise ValueError(
            f"an index of {type(cb).__name__} codes cannot be exported to faiss; export raw vectors or PQ codes"
        )
    if index.fast_scan and index.nlist > 1 and index.metric != "l2":
        raise ValueError(
            "faiss's IndexIVFPQFastScan scores inner products with its coarse quantizer's L2 distances as the list "
            "offsets, so an exported ivf fast-scan index with metric ip / cos would return wrong neighbours; "
            "build it with fast_scan=False to export it as an IndexIVFPQ"
        )
    return faiss_copy(index, label_rows=label_rows)


def faiss_copy(index: Index, *, label_rows: bool):
    """`to_faiss` without its refusal: an IVF fast-scan copy with inner products is right only
    when searched with vqlib's probes and list offsets (the search engine's `search_preassigned`)."""
    faiss = _faiss()
    cb = index.codebook
    d = index.dim
    metric = faiss.METRIC_L2 if index.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    keep = np.flatnonzero(np.asarray(index.live))
    data, ids = np.asarray(index.data)[keep], (keep.astype(np.int64) if label_rows else index.ids[keep])
    lists = np.asarray(row_lists(index.offsets, index.data.shape[0]))[keep]
    if cb is None:
        if index.nlist == 1:
            out = faiss.IndexFlat(d, metric)
            wrapped = _with_ids(faiss, out, ids)
            out.add(data)
            return _set_ids(faiss, wrapped, ids)
        out = faiss.IndexIVFFlat(_coarse(faiss, index), d, index.nlist, metric)
    else:
        m, k, _ = cb.centroids.shape
        nbits = code_layout(cb).bits
        if index.nlist == 1:
            out = faiss.IndexPQ(d, m, nbits, metric)
        else:
            out = faiss.IndexIVFPQ(_coarse(faiss, index), d, index.nlist, m, nbits, metric)
            out.by_residual = True
        faiss.copy_array_to_vector(np.asarray(cb.centroids, np.float32).ravel(), out.pq.centroids)
        out.is_trained = True
        if index.nlist == 1:
            faiss.copy_array_to_vector(data.ravel(), out.codes)
            out.ntotal = len(keep)
            if index.fast_scan:
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
    if index.fast_scan:
        fast = faiss.IndexIVFPQFastScan(out)
        fast.__dict__["_vqlib_inner"] = out
        out = fast
    return _with_opq(faiss, out, cb)


def _coarse(faiss, index: Index):
    """faiss's coarse quantizer; behind an OPQ transform it sees rotated vectors: c' = c R."""
    centroids = np.asarray(index.centroids, np.float32)
    if index.codebook is not None and index.codebook.rotation is not None:
        centroids = np.asarray(rotate(index.codebook.rotation, centroids), np.float32)
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
    d = cb.rotation.factor.shape[0]
    opq = faiss.OPQMatrix(d, cb.centroids.shape[0])
    faiss.copy_array_to_vector(np.asarray(cb.rotation.factor, np.float32).ravel(), opq.A)
    opq.is_trained = True
    opq.is_orthonormal = True
    wrapped = faiss.IndexPreTransform(opq, out)
    wrapped.__dict__["_vqlib_inner"] = (out, opq)
    return wrapped
