"""ANN indexes as immutable pytrees: build, add, delete, compact.

Every index is an inverted file: `nlist` coarse centroids and, for each list, a contiguous run
of rows (CSR layout: list l holds rows offsets[l]:offsets[l + 1]). The flat kinds are the case
nlist = 1 with a zero centroid, so one search path serves all of them. A row stores either the
raw vector ("flat", "ivfflat") or the packed code of the vector's residual from its list's
centroid ("pq", "ivfpq", "pqfs", "ivfpqfs"), or a data-oblivious TurboQuant code ("tq") or
RaBitQ sign code ("rabitq"); these two are flat kinds, read by an unbiased inner-product estimate.

| kind | codes | search | faiss peer |
|---|---|---|---|
| flat | float32 vector | exact | IndexFlat |
| ivfflat | float32 vector | exact within the probed lists | IndexIVFFlat |
| pq / ivfpq | m codes of `nbits` (OPQ optional) | ADC, float tables | IndexPQ / IndexIVFPQ |
| pqfs / ivfpqfs | m 4-bit codes, 2 per byte | ADC, tables rounded to uint8 | IndexPQFastScan / IndexIVFPQFastScan |
| tq | TurboQuant-prod (bits >= 2) or QJL signs (bits = 1) | unbiased inner-product estimate | - |
| rabitq | RaBitQ: d sign bits + two float32 | unbiased inner-product estimate | IndexRaBitQ |

Any kind may keep the raw vectors (`keep_vectors=True`) so `search(..., rerank=R)` re-scores
its R best candidates exactly (faiss's IndexRefineFlat).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from vqlib import _checks
from vqlib._fit import code_layout as vqlib_layout
from vqlib._progress import progress as progress_bar
from vqlib._types import pytree_dataclass, static_field
from vqlib.codebooks import _kmeans, _packing, _product, _rabitq, _turboquant
from vqlib.kernels import assign

KINDS = ("flat", "ivfflat", "pq", "ivfpq", "pqfs", "ivfpqfs", "tq", "rabitq")
METRICS = ("l2", "ip", "cos")
_CODEC = {
    "flat": "raw",
    "ivfflat": "raw",
    "pq": "pq",
    "ivfpq": "pq",
    "pqfs": "pqfs",
    "ivfpqfs": "pqfs",
    "tq": "tq",
    "rabitq": "rabitq",
}
_ENCODE_CHUNK = 65536  # rows encoded per step of a build (progress bar granularity)
BLOCK = 64  # lists start on multiples of BLOCK rows, so a search reads whole blocks


@pytree_dataclass
class Index:
    """An ANN index; see the module docstring for the kinds.

    Attributes:
        centroids: (nlist, d) float32 coarse centroids; one zero row for the flat kinds.
        codebook: ProductCodebook (pq kinds), a TurboQuant/QJL codebook ("tq"), a RaBitQCodebook
            ("rabitq") or None (raw kinds).
        data: (n, w) rows grouped by list: float32 vectors (raw kinds) or packed uint8 codes.
        offsets: (nlist + 1,) int32, multiples of BLOCK; list l holds rows offsets[l]:offsets[l + 1],
            its vectors first, then padding rows up to the next block.
        ids: (n,) int64 numpy array of user ids, one per row, -1 on padding rows (kept on the
            host: JAX is 32-bit).
        live: (n,) bool; False on padding rows and on deleted rows until `compact` drops them.
        vectors: (n, d) float32 raw vectors for exact re-ranking, or None.
        kind: one of KINDS.
        metric: "l2" (squared distances, ascending), "ip" or "cos" (similarities, descending).
            "cos" stores and searches unit vectors.
        nbits: bits per packed code column (PQ kinds; "tq", "rabitq"), 0 for raw kinds.
    """

    centroids: jax.Array
    codebook: object
    data: jax.Array
    offsets: jax.Array
    ids: np.ndarray
    live: jax.Array
    vectors: jax.Array | None
    kind: str = static_field()
    metric: str = static_field()
    nbits: int = static_field(0)

    @property
    def ntotal(self) -> int:
        """Live vectors (deleted ones excluded)."""
        return int(jnp.sum(self.live))

    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]


def codec(kind: str) -> str:
    return _CODEC[kind]


def code_width(index: Index) -> int:
    """Codes per row (m for PQ kinds, the codebook's columns for "tq" / "rabitq"), 0 for raw rows."""
    if codec(index.kind) == "raw":
        return 0
    if codec(index.kind) in ("tq", "rabitq"):
        return vqlib_layout(index.codebook).num_codebooks
    return index.codebook.centroids.shape[0]


def bytes_per_vector(index: Index) -> int:
    """Bytes one row of `data` takes (the figure ANN comparisons hold equal); re-ranking vectors excluded."""
    return index.data.shape[1] * index.data.dtype.itemsize


def check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def check_metric(metric) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def _prepare(x, metric: str, name: str = "x"):
    """Validated float32 (n, d) vectors; unit rows for "cos" (a zero row is refused)."""
    x = _checks.check_float_array(x, name, ndim=2).astype(jnp.float32)
    if metric == "cos":
        norms = jnp.linalg.norm(x, axis=1, keepdims=True)
        if _checks.is_concrete(x) and bool(jnp.any(norms == 0)):
            raise ValueError(f"{name} has zero vectors, which have no cosine; drop them or use metric='ip'")
        x = x / norms
    return x


def _check_ids(ids, n: int, existing: np.ndarray) -> np.ndarray:
    """User ids as int64 (n,), distinct and not already in the index; sequential when None."""
    if ids is None:
        start = int(existing.max()) + 1 if existing.size else 0
        return np.arange(start, start + n, dtype=np.int64)
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be integers (int64), got dtype {ids.dtype}")
    if ids.shape != (n,):
        raise ValueError(f"ids must have shape ({n},), one per vector, got {ids.shape}")
    ids = ids.astype(np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError(f"ids must be non-negative (-1 marks a missing result), got {ids.min()}")
    if np.unique(ids).size != n:
        raise ValueError("ids has repeated values; every vector needs its own id")
    clash = np.intersect1d(ids, existing)
    if clash.size:
        raise ValueError(f"ids {clash[:5].tolist()} are already in the index; delete them first or pass new ids")
    return ids


# ----------------------------------------------------------------------------- encoding


def _assign_lists(centroids, x):
    """(n, d) -> (n,) int32 nearest coarse centroid (L2, as faiss's IVF quantizer for every metric)."""
    return assign(x, centroids)[0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("kind", "nbits"))
def _encode_rows(centroids, codebook, x, lists, *, kind: str, nbits: int):
    """(n, d) vectors in lists -> (n, w) rows of `data`."""
    if codec(kind) == "raw":
        return x
    if codec(kind) == "tq":
        codes = _turboquant._encode(codebook, x)
    elif codec(kind) == "rabitq":
        codes = _rabitq._encode(codebook, x)
    else:
        codes = _product.encode(codebook, x - centroids[lists])
    return _packing._pack(codes, nbits)


def _encode_all(index_parts, x, *, kind: str, nbits: int, show: bool):
    """Lists and rows for x, in chunks (bounded memory, a progress bar when `show`)."""
    centroids, codebook = index_parts
    lists, rows = [], []
    chunks = range(0, x.shape[0], _ENCODE_CHUNK)
    for start in progress_bar(chunks, total=len(chunks), desc="encoding", enabled=show):
        part = x[start : start + _ENCODE_CHUNK]
        ls = _assign_lists(centroids, part) if centroids.shape[0] > 1 else jnp.zeros(part.shape[0], jnp.int32)
        lists.append(ls)
        rows.append(_encode_rows(centroids, codebook, part, ls, kind=kind, nbits=nbits))
    return jnp.concatenate(lists), jnp.concatenate(rows)


def block_layout(lists: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows grouped by list, each list starting on a multiple of BLOCK rows.

    Returns (source (n_padded,) int64: the input row each stored row comes from, -1 for
    padding; offsets (nlist + 1,) int32). Stable: rows keep their order within a list.
    """
    counts = np.bincount(lists, minlength=nlist)
    padded = -(-counts // BLOCK) * BLOCK
    offsets = np.concatenate([[0], np.cumsum(padded)]).astype(np.int32)
    source = np.full(int(offsets[-1]), -1, np.int64)
    order = np.argsort(lists, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    within = np.arange(lists.size) - np.repeat(starts, counts)
    source[np.repeat(offsets[:-1], counts) + within] = order
    return source, offsets


def take_rows(column, source: np.ndarray, fill=0):
    """column[source], with `fill` where source is -1 (numpy or JAX column)."""
    if column is None:
        return None
    if isinstance(column, np.ndarray):
        return np.where((source >= 0).reshape(-1, *[1] * (column.ndim - 1)), column[np.maximum(source, 0)], fill)
    rows = jnp.asarray(np.maximum(source, 0))
    keep = jnp.asarray(source >= 0).reshape(-1, *[1] * (column.ndim - 1))
    return jnp.where(keep, column[rows], jnp.asarray(fill, column.dtype))


def _regroup(index: Index, lists: np.ndarray, **columns) -> Index:
    """`index` with the given row columns laid out by `block_layout` of `lists`."""
    source, offsets = block_layout(lists, index.nlist)
    laid = {name: take_rows(col, source, -1 if name == "ids" else 0) for name, col in columns.items()}
    return dataclasses.replace(index, offsets=jnp.asarray(offsets), **laid)


def row_lists(offsets, n: int):
    """(n,) int32 list of each row, from the CSR offsets."""
    return (jnp.searchsorted(offsets, jnp.arange(n, dtype=jnp.int32), side="right") - 1).astype(jnp.int32)


# ----------------------------------------------------------------------------- build / add / delete


def _train(key, x, kind: str, metric: str, *, nlist, m, nbits, opq, bits, train_size, max_iter):
    """Coarse centroids and codebook for `kind`, trained on at most `train_size` rows of x."""
    n, d = x.shape
    k_sample, k_coarse, k_codes = jax.random.split(key, 3)
    if train_size is not None and n > train_size:
        x = x[jax.random.choice(k_sample, n, (train_size,), replace=False)]
    centroids = jnp.zeros((1, d), jnp.float32)
    if kind.startswith("ivf"):
        cb = _kmeans.fit_kmeans(k_coarse, x, k=nlist, max_iter=max_iter, tol=0.0)
        centroids = cb.centroids
    if codec(kind) in ("pq", "pqfs"):
        residuals = x - centroids[_assign_lists(centroids, x)] if centroids.shape[0] > 1 else x
        fit = _product.fit_opq if opq else _product.fit_pq
        return centroids, fit(k_codes, residuals, m=m, k=2**nbits)
    if codec(kind) == "tq":
        fit = _turboquant.fit_qjl if bits == 1 else _turboquant.fit_turboquant_prod
        return centroids, fit(k_codes, x, bits=bits, norm_dtype="float32")
    if codec(kind) == "rabitq":
        return centroids, _rabitq.fit_rabitq(k_codes, x)
    return centroids, None


def build(
    x,
    kind: str = "flat",
    *,
    metric: str = "l2",
    nlist: int | None = None,
    m: int | None = None,
    nbits: int = 8,
    opq: bool = False,
    bits: int = 1,
    ids=None,
    keep_vectors: bool | None = None,
    train_size: int | None = None,
    max_iter: int = 20,
    key=None,
    progress: bool = False,
) -> Index:
    """Trains an index of `kind` on x and adds x to it.

    Args:
        x: (n, d) float vectors, finite.
        kind: one of "flat", "ivfflat", "pq", "ivfpq", "pqfs", "ivfpqfs", "tq", "rabitq".
        metric: "l2", "ip" or "cos".
        nlist: coarse lists of the "ivf*" kinds (default about 4 sqrt(n)); 1 <= nlist <= n.
        m: PQ codes per vector (d divisible by m; even for fast-scan). Bytes per vector:
            m * nbits / 8.
        nbits: bits per PQ code, 1-16 ("pq", "ivfpq"); the fast-scan kinds use 4.
        opq: learn an OPQ rotation before the PQ (PQ kinds).
        bits: TurboQuant bits per coordinate for "tq": 1 is QJL sign codes (one bit per
            dimension), b >= 2 TurboQuant-prod; plus one float32 norm (two for b >= 2).
        ids: (n,) int64 user ids, distinct; default 0 .. n-1.
        keep_vectors: also store the raw vectors for `search(..., rerank=R)` (default: True
            for "tq" and "rabitq", whose estimates are meant to be re-ranked; False otherwise).
        train_size: train on a uniform sample of this many rows (default: nlist * 256 for the
            coarse quantizer, as faiss; PQ then samples 256 points per centroid).
        max_iter: Lloyd iterations of the coarse k-means.
        key: PRNG key (training samples and seeds); default jax.random.key(0).
        progress: report training time and draw a progress bar while encoding (stderr).

    Returns:
        The Index.

    Example:
        >>> import numpy as np, vqlib
        >>> x = np.random.default_rng(0).normal(size=(1000, 16)).astype("float32")
        >>> index = vqlib.retrieval.build(x, "ivfflat", nlist=8)
        >>> scores, ids = vqlib.retrieval.search(index, x[:2], k=3, nprobe=8)
        >>> ids[:, 0].tolist()
        [0, 1]
    """
    kind, metric = check_kind(kind), check_metric(metric)
    x = _prepare(x, metric)
    n, d = x.shape
    if n == 0:
        raise ValueError("x is empty; an index is trained on at least one vector")
    if kind.startswith("ivf"):
        nlist = max(1, min(n, int(4 * np.sqrt(n)))) if nlist is None else nlist
        nlist = _checks.check_int(nlist, "nlist", low=1, high=n)
    elif nlist not in (None, 1):
        raise ValueError(f"nlist={nlist} applies to the ivf kinds; use kind='ivf{kind}' or drop nlist")
    if codec(kind) in ("pq", "pqfs"):
        if m is None:
            raise ValueError(f"kind={kind!r} needs m, the number of PQ codes per vector (a divisor of d={d})")
        m = _product._check_subspaces(d, m)
        nbits = 4 if codec(kind) == "pqfs" else _checks.check_int(nbits, "nbits", low=1, high=16)
        if codec(kind) == "pqfs" and m % 2:
            raise ValueError(f"fast-scan packs two 4-bit codes per byte, so m must be even; got m={m}")
    else:
        nbits = 0
    if codec(kind) == "tq":
        bits = _checks.check_int(bits, "bits", low=1, high=4)
    keep_vectors = kind in ("tq", "rabitq") if keep_vectors is None else bool(keep_vectors)
    if train_size is None and kind.startswith("ivf"):
        train_size = 256 * nlist
    train_size = None if train_size is None else _checks.check_int(train_size, "train_size", low=1)
    key = jax.random.key(0) if key is None else key
    options = dict(nlist=nlist, m=m, nbits=nbits, opq=opq, bits=bits, train_size=train_size, max_iter=max_iter)
    for _ in progress_bar(range(1), total=1, desc="training", enabled=progress):  # reports the time taken
        centroids, codebook = _train(key, x, kind, metric, **options)
    if codec(kind) in ("tq", "rabitq"):
        nbits = vqlib_layout(codebook).bits
    empty = Index(
        centroids=centroids,
        codebook=codebook,
        data=jnp.zeros(
            (0, _row_width(kind, d, m, nbits, codebook)), jnp.float32 if codec(kind) == "raw" else jnp.uint8
        ),
        offsets=jnp.zeros(centroids.shape[0] + 1, jnp.int32),
        ids=np.zeros(0, np.int64),
        live=jnp.zeros(0, bool),
        vectors=jnp.zeros((0, d), jnp.float32) if keep_vectors else None,
        kind=kind,
        metric=metric,
        nbits=nbits,
    )
    return add(empty, x, ids=ids, progress=progress)


def _row_width(kind: str, d: int, m, nbits: int, codebook) -> int:
    if codec(kind) == "raw":
        return d
    width = m if codec(kind) in ("pq", "pqfs") else vqlib_layout(codebook).num_codebooks
    return _packing.packed_width(width, nbits)


def add(index: Index, x, *, ids=None, progress: bool = False) -> Index:
    """Returns `index` with the vectors x added (the index passed in is unchanged).

    Encoding costs O(len(x)); the rows are then laid out again, list by list, which copies the
    whole index (O(n)): add in batches rather than one vector at a time.

    Args:
        index: an Index from `build`.
        x: (n, d) float vectors.
        ids: (n,) int64 ids, distinct and new to the index; default: sequential after the
            largest id present.
        progress: progress bar on stderr while encoding.
    """
    x = _prepare(x, index.metric)
    _checks.check_dim(x, index.dim, "x", "the index was built for")
    new_ids = _check_ids(ids, x.shape[0], index.ids)
    lists, rows = _encode_all((index.centroids, index.codebook), x, kind=index.kind, nbits=index.nbits, show=progress)
    keep = np.flatnonzero(index.ids >= 0)  # stored rows, not padding
    old = jnp.asarray(keep)
    return _regroup(
        index,
        np.concatenate([np.asarray(row_lists(index.offsets, index.data.shape[0]))[keep], np.asarray(lists)]),
        data=jnp.concatenate([index.data[old], rows]),
        ids=np.concatenate([index.ids[keep], new_ids]),
        live=jnp.concatenate([index.live[old], jnp.ones(x.shape[0], bool)]),
        vectors=None if index.vectors is None else jnp.concatenate([index.vectors[old], x]),
    )


def delete(index: Index, ids) -> Index:
    """Returns `index` with the vectors of `ids` marked deleted (searches skip them).

    The rows stay until `compact`; deleting an id that is absent (or already deleted) raises
    ValueError and changes nothing.
    """
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 1:
        raise TypeError(f"ids must be a 1-D integer array, got dtype {ids.dtype} and shape {ids.shape}")
    hit = np.isin(index.ids, ids) & np.asarray(index.live)  # padding rows are never live
    missing = np.setdiff1d(ids, index.ids[hit])
    if missing.size:
        raise ValueError(f"ids {missing[:5].tolist()} are not in the index (or already deleted); nothing was deleted")
    return dataclasses.replace(index, live=index.live & jnp.asarray(~hit))


def compact(index: Index) -> Index:
    """Returns `index` without its deleted rows (ids and search results unchanged)."""
    keep = np.flatnonzero(np.asarray(index.live))
    rows = jnp.asarray(keep)
    return _regroup(
        index,
        np.asarray(row_lists(index.offsets, index.data.shape[0]))[keep],
        data=index.data[rows],
        ids=index.ids[keep],
        live=jnp.ones(keep.size, bool),
        vectors=None if index.vectors is None else index.vectors[rows],
    )
