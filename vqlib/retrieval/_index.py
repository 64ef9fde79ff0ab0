"""ANN indexes as immutable pytrees: coarse centroids plus any registered codebook.

Every index is an inverted file: `nlist` coarse centroids and, for each list, a contiguous run
of rows (see `_lists`). A row holds either the raw vector (no codebook: "flat", "ivfflat") or the
packed code of the vector's residual from its list's centroid, by any codebook registered with
`vqlib.codebooks.register` (PQ, OPQ, RVQ, AQ, TurboQuant, QJL, RaBitQ, E8P, or a user's own). The
flat indexes are the case nlist = 1 with a zero centroid, so one search path serves all of them.
How rows are scored follows from what the codebook offers (`_scoring`): lookup tables (PQ, RVQ,
AQ, ...; `fast_scan=True` rounds them to 8-bit integers as faiss's fast-scan does), else its
inner-product estimator (TurboQuant, QJL, RaBitQ).

`build(x, method, nlist=..., **options)` takes a method name of `vqlib.fit` (the options go to
its fit) or one of the shorthands in KINDS, which faiss users know:

| kind | method | faiss peer |
|---|---|---|
| flat / ivfflat | raw float32 vectors | IndexFlat / IndexIVFFlat |
| pq / ivfpq | "pq", m codes of k = 2**bits (8 by default) | IndexPQ / IndexIVFPQ |
| pqfs / ivfpqfs | "pq" with k = 16, fast_scan=True | IndexPQFastScan / IndexIVFPQFastScan |
| tq | "turboquant_prod" (bits >= 2) or "qjl" (bits = 1), float32 norms | - |
| rabitq | "rabitq" | IndexRaBitQ |

Any index may keep the raw vectors (`keep_vectors=True`) so `search(..., rerank=R)` re-scores
its R best candidates exactly (faiss's IndexRefineFlat).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float, Int

from vqlib import _checks
from vqlib._progress import progress as progress_bar
from vqlib._types import VALIDATORS, Metric, pytree_dataclass, static_field
from vqlib.codebooks import (
    code_layout,
    codebook_type,
    fit,
    fit_kmeans,
    has_tables,
    methods,
    pack_codes,
    table_bias,
    unpack_codes,
    validate_codebook,
)
from vqlib.kernels import assign
from vqlib.retrieval._lists import BLOCK, block_layout, row_lists, take_rows

# shorthand -> (method, inverted lists, options the shorthand implies)
KINDS: dict[str, tuple[str, bool, dict]] = {
    "flat": ("flat", False, {}),
    "ivfflat": ("flat", True, {}),
    "pq": ("pq", False, {}),
    "ivfpq": ("pq", True, {}),
    "pqfs": ("pq", False, dict(k=16, fast_scan=True)),
    "ivfpqfs": ("pq", True, dict(k=16, fast_scan=True)),
    "tq": ("turboquant_prod", False, dict(norm_dtype="float32")),
    "rabitq": ("rabitq", False, {}),
}
_ENCODE_CHUNK = 65536  # rows encoded per step of a build (progress bar granularity)


@pytree_dataclass
class Index:
    """An ANN index; see the module docstring.

    Attributes:
        centroids: (nlist, d) float32 coarse centroids; one zero row for the flat indexes.
        codebook: the codebook of the rows (of x - centroid of its list), or None for raw rows.
        data: (n, w) rows grouped by list: float32 vectors (no codebook) or packed uint8 codes.
        bias: (n,) float32 per-row term of the table scores (||x_hat||^2 for codebooks whose L2
            tables need it, e.g. RVQ and AQ), or None.
        offsets: (nlist + 1,) int32, multiples of BLOCK; list l holds rows offsets[l]:offsets[l + 1],
            its vectors first, then padding rows up to the next block.
        ids: (n,) int64 numpy array of user ids, one per row, -1 on padding rows (kept on the
            host: JAX is 32-bit).
        live: (n,) bool; False on padding rows and on deleted rows until `compact` drops them.
        vectors: (n, d) float32 raw vectors for exact re-ranking, or None.
        metric: "l2" (squared distances, ascending), "ip" or "cos" (similarities, descending).
            "cos" stores and searches unit vectors.
        fast_scan: table scores rounded to 8-bit integers per query (codebooks of 16 codes).
        method: the `vqlib.fit` method that trained the codebook ("flat" without one), for display.
    """

    centroids: jax.Array
    codebook: object
    data: jax.Array
    bias: jax.Array | None
    offsets: jax.Array
    ids: np.ndarray
    live: jax.Array
    vectors: jax.Array | None
    metric: str = static_field("l2")
    fast_scan: bool = static_field(False)
    method: str = static_field("flat")

    @property
    def ntotal(self) -> int:
        """Live vectors (deleted ones excluded)."""
        return int(np.count_nonzero(np.asarray(self.live)))

    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    @property
    def kind(self) -> str:
        """A faiss-like name: "ivf" for inverted lists, the method, "fs" for fast-scan (e.g. "ivfpqfs")."""
        return ("ivf" if self.nlist > 1 else "") + self.method + ("fs" if self.fast_scan else "")


def code_width(index: Index) -> int:
    """Codes per row (the codebook's code columns), 0 for raw rows."""
    return 0 if index.codebook is None else code_layout(index.codebook).num_codebooks


def pack_bits(index: Index) -> int:
    """Bits each code column is packed at, 0 for raw rows."""
    return 0 if index.codebook is None else code_layout(index.codebook).bits


def row_codes(index: Index, data):
    """Packed rows (n, bytes) -> (n, w) int32 codes of `index`'s codebook."""
    return unpack_codes(data, pack_bits(index), code_width(index))


def bytes_per_vector(index: Index) -> int:
    """Bytes one row takes: its code (or vector) and its bias, if any (the figure ANN comparisons
    hold equal); re-ranking vectors excluded."""
    extra = 0 if index.bias is None else index.bias.dtype.itemsize
    return index.data.shape[1] * index.data.dtype.itemsize + extra


def check_kind(kind) -> str:
    if kind not in KINDS and kind not in methods():
        raise ValueError(f"kind must be one of {sorted(KINDS)} or a vqlib.fit method {list(methods())}, got {kind!r}")
    return kind


def prepare(x, metric: str, name: str = "x"):
    """Validated float32 (n, d) vectors; unit rows for "cos" (a zero row is refused)."""
    x = _checks.check_float_array(x, name, ndim=2, vectors=True).astype(jnp.float32)
    if metric == "cos":
        x, has_zero = _unit_rows(x)
        if _checks.is_concrete(x) and bool(has_zero):
            raise ValueError(f"{name} has zero vectors, which have no cosine; drop them or use metric='ip'")
    return x


@jax.jit
def _unit_rows(x):
    """x with unit rows, and whether a row was zero (one program)."""
    norms = jnp.linalg.norm(x, axis=1, keepdims=True)
    return x / norms, jnp.any(norms == 0)


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


def stores_bias(codebook, metric: str) -> bool:
    """Whether rows carry a bias: table scoring in the L2 form by a codebook whose L2 tables need
    ||x_hat||^2 added (see `vqlib.codebooks.table_bias`)."""
    if codebook is None or not has_tables(codebook):
        return False
    l2_form = metric == "l2" or (metric == "cos" and codebook_type(codebook).cos_as_l2)
    return l2_form and codebook_type(codebook).l2_tables is None


def _assign_lists(centroids, x):
    """(n, d) -> (n,) int32 nearest coarse centroid (L2, as faiss's IVF quantizer for every metric)."""
    if centroids.shape[0] == 1:
        return jnp.zeros(x.shape[0], jnp.int32)
    return assign(x, centroids)[0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("bits", "with_bias"))
def _encode_chunk(codebook, centroids, x, *, bits: int, with_bias: bool):
    """(n, d) vectors -> lists (n,), codes (n, w) int32, rows of `data` and biases (or None): one
    compiled program per chunk shape (eagerly, each step was a program of its own: a fresh
    process spent most of a small build tracing and loading them)."""
    lists = _assign_lists(centroids, x)
    if codebook is None:
        return lists, None, x, None
    t = codebook_type(codebook)
    codes = t.encode(codebook, x - centroids[lists])
    codes = codes[:, None] if t.scalar_codes else codes
    bias = table_bias(codebook, codes) if with_bias else None
    return lists, codes, pack_codes(codes, bits), bias


def _encode_rows(index: Index, x):
    """(n, d) vectors -> ((n,) lists, (n, w) rows of `data`, (n,) bias or None); the codes are
    checked in range on the host (packing under jit cannot check them)."""
    lists, codes, rows, bias = _encode_chunk(
        index.codebook, index.centroids, x, bits=pack_bits(index), with_bias=index.bias is not None
    )
    if codes is not None:
        _checks.check_codes(np.asarray(codes), 2 ** pack_bits(index), name="codes (packed into the index)")
    return lists, rows, bias


def _encode_all(index: Index, x, *, show: bool):
    """Lists, rows and biases for x, in chunks (bounded memory, a progress bar when `show`)."""
    lists, rows, biases = [], [], []
    chunks = range(0, x.shape[0], _ENCODE_CHUNK)
    for start in progress_bar(chunks, total=len(chunks), desc="encoding", enabled=show):
        part_lists, part_rows, part_bias = _encode_rows(index, x[start : start + _ENCODE_CHUNK])
        lists.append(part_lists)
        rows.append(part_rows)
        biases.append(part_bias)
    bias = None if index.bias is None else jnp.concatenate(biases)
    if not rows:
        return jnp.zeros((0,), jnp.int32), index.data[:0], None if bias is None else index.bias[:0]
    return jnp.concatenate(lists), jnp.concatenate(rows), bias


def _regroup(index: Index, lists: np.ndarray, **columns) -> Index:
    """`index` with the given row columns laid out by `block_layout` of `lists`."""
    source, offsets = block_layout(lists, index.nlist)
    laid = {name: take_rows(col, source, -1 if name == "ids" else 0) for name, col in columns.items()}
    return dataclasses.replace(index, offsets=jnp.asarray(offsets), **laid)


# ----------------------------------------------------------------------------- build / add / delete


def _resolve(kind: str, nlist, options: dict) -> tuple[str, bool, dict]:
    """(method, inverted lists, fit options) of a kind or method name."""
    method, ivf, implied = KINDS.get(kind, (kind, False, {}))
    options = {**implied, **options}
    if kind == "tq" and options.get("bits", 1) == 1:
        method = "qjl"  # one sign bit per dimension and a norm
    if nlist not in (None, 1) and not ivf:
        if kind not in methods():
            raise ValueError(
                f"nlist={nlist} applies to the ivf kinds and to methods; use kind='ivf{kind}' or drop nlist"
            )
        ivf = True  # a method with lists: IVF-PQ, IVF-RVQ, IVF-RaBitQ, ...
    return method, ivf, options


def _train(key, x, method: str, *, nlist: int, train_size, max_iter: int, options: dict):
    """Coarse centroids and codebook, trained on at most `train_size` rows of x."""
    n, d = x.shape
    k_sample, k_coarse, k_codes = jax.random.split(key, 3)
    if train_size is not None and n > train_size:
        x = x[jax.random.choice(k_sample, n, (train_size,), replace=False)]
    centroids = jnp.zeros((1, d), jnp.float32)
    if nlist > 1:
        centroids = fit_kmeans(k_coarse, x, k=nlist, max_iter=max_iter, tol=0.0).centroids
    if method == "flat":
        return centroids, None
    return centroids, fit(_residuals(centroids, x), method, key=k_codes, **options)


@jax.jit
def _residuals(centroids, x):
    """x minus its nearest coarse centroid (one program)."""
    return x - centroids[_assign_lists(centroids, x)]


def build(
    x: Float[ArrayLike, "n d"],
    kind: str = "flat",
    *,
    metric: Metric = "l2",
    nlist: int | None = None,
    fast_scan: bool = False,
    ids: Int[ArrayLike, " n"] | None = None,
    keep_vectors: bool | None = None,
    train_size: int | None = None,
    max_iter: int = 20,
    key=None,
    progress: bool = False,
    **options,
) -> Index:
    """Trains an index on x and adds x to it.

    Args:
        x: (n, d) float vectors, finite.
        kind: a shorthand of KINDS ("flat", "ivfflat", "pq", "ivfpq", "pqfs", "ivfpqfs", "tq",
            "rabitq") or any `vqlib.fit` method ("pq", "opq", "rvq", "aq", "turboquant_prod",
            "rabitq", a registered one ...); with a method, nlist > 1 makes it an IVF index.
        metric: "l2", "ip" or "cos".
        nlist: coarse lists (the "ivf*" kinds default to about 4 sqrt(n)); 1 <= nlist <= n.
        fast_scan: round the lookup tables to 8-bit integers per query (faiss's fast-scan);
            needs a codebook with tables of 16 codes (e.g. PQ with k=16) and an even number of
            codes per vector.
        ids: (n,) int64 user ids, distinct; default 0 .. n-1.
        keep_vectors: also store the raw vectors for `search(..., rerank=R)` (default: True for
            codebooks without tables, whose estimates are meant to be re-ranked).
        train_size: train on a uniform sample of this many rows (default: nlist * 256 for the
            coarse quantizer, as faiss; the codebook fit samples its own).
        max_iter: Lloyd iterations of the coarse k-means.
        key: PRNG key (training samples and seeds); default jax.random.key(0).
        progress: report training time and draw a progress bar while encoding (stderr).
        **options: the codebook's fit options, e.g. m and k for PQ / RVQ / AQ (bytes per vector
            m * log2(k) / 8), bits for TurboQuant ("tq": 1 is QJL sign codes, b >= 2
            TurboQuant-prod).

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
    kind = check_kind(kind)
    metric = _checks.check_metric(metric)
    x = prepare(x, metric)
    n, d = x.shape
    if n == 0:
        raise ValueError("x is empty; an index is trained on at least one vector")
    method, ivf, options = _resolve(kind, nlist, options)
    fast_scan = _checks.check_bool(options.pop("fast_scan", fast_scan), "fast_scan")
    if method == "flat" and options:
        raise ValueError(f"options {sorted(options)} apply to a codebook; kind={kind!r} stores raw vectors")
    if method in ("pq", "opq") and "m" not in options:
        raise ValueError(f"kind={kind!r} needs m, the number of PQ codes per vector (a divisor of d={d})")
    nlist = (max(1, min(n, int(4 * np.sqrt(n)))) if nlist is None else nlist) if ivf else 1
    nlist = _checks.check_int(nlist, "nlist", low=1, high=n)
    if fast_scan and options.get("k", 16) != 16:
        raise ValueError(f"fast_scan codes have 16 values (4 bits); got k={options['k']}")
    if train_size is None and nlist > 1:
        train_size = 256 * nlist
    train_size = None if train_size is None else _checks.check_int(train_size, "train_size", low=1)
    key = jax.random.key(0) if key is None else key
    for _ in progress_bar(range(1), total=1, desc="training", enabled=progress):  # reports the time taken
        centroids, codebook = _train(
            key, x, method, nlist=nlist, train_size=train_size, max_iter=max_iter, options=options
        )
    return add(empty_index(centroids, codebook, metric, fast_scan, keep_vectors, method), x, ids=ids, progress=progress)


def empty_index(centroids, codebook, metric: str, fast_scan: bool, keep_vectors: bool | None, method: str) -> Index:
    """An index with its quantizers and no rows (checks that the codebook can serve it)."""
    d = centroids.shape[1]
    if codebook is not None and codebook_type(codebook).dim(codebook) != d:
        raise ValueError(f"the codebook codes vectors of d={codebook_type(codebook).dim(codebook)}, the index d={d}")
    if fast_scan:
        layout = None if codebook is None else code_layout(codebook)
        if layout is None or not has_tables(codebook) or layout.num_codes != 16:
            raise ValueError("fast_scan needs a codebook with lookup tables of 16 codes, e.g. kind='pqfs' or k=16")
        if layout.num_codebooks % 2:
            raise ValueError(
                f"fast-scan packs two 4-bit codes per byte, so m must be even; got m={layout.num_codebooks}"
            )
    estimates = codebook is not None and not has_tables(codebook)
    keep_vectors = estimates if keep_vectors is None else bool(keep_vectors)
    if codebook is None:
        data = jnp.zeros((0, d), jnp.float32)
    else:
        layout = code_layout(codebook)
        data = jnp.zeros((0, -(-layout.num_codebooks * layout.bits // 8)), jnp.uint8)
    return Index(
        centroids=jnp.asarray(centroids, jnp.float32),
        codebook=codebook,
        data=data,
        bias=jnp.zeros((0,), jnp.float32) if stores_bias(codebook, metric) else None,
        offsets=jnp.zeros(centroids.shape[0] + 1, jnp.int32),
        ids=np.zeros(0, np.int64),
        live=jnp.zeros(0, bool),
        vectors=jnp.zeros((0, d), jnp.float32) if keep_vectors else None,
        metric=metric,
        fast_scan=fast_scan,
        method=method,
    )


def add(
    index: Index, x: Float[ArrayLike, "n d"], *, ids: Int[ArrayLike, " n"] | None = None, progress: bool = False
) -> Index:
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
    if not isinstance(index, Index):
        raise TypeError(f"index must be a vqlib.retrieval.Index, got {type(index).__name__}")
    x = prepare(x, index.metric)
    _checks.check_dim(x, index.dim, "x", "the index was built for")
    new_ids = _check_ids(ids, x.shape[0], index.ids)
    if x.shape[0] == 0:
        return index
    lists, rows, bias = _encode_all(index, x, show=progress)
    keep = np.flatnonzero(index.ids >= 0)  # stored rows, not padding
    old = jnp.asarray(keep)
    return _regroup(
        index,
        np.concatenate([np.asarray(row_lists(index.offsets, index.data.shape[0]))[keep], np.asarray(lists)]),
        data=jnp.concatenate([index.data[old], rows]),
        bias=None if index.bias is None else jnp.concatenate([index.bias[old], bias]),
        ids=np.concatenate([index.ids[keep], new_ids]),
        live=jnp.concatenate([index.live[old], jnp.ones(x.shape[0], bool)]),
        vectors=None if index.vectors is None else jnp.concatenate([index.vectors[old], x]),
    )


def delete(index: Index, ids: Int[ArrayLike, " r"]) -> Index:
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
        bias=None if index.bias is None else index.bias[rows],
        ids=index.ids[keep],
        live=jnp.ones(keep.size, bool),
        vectors=None if index.vectors is None else index.vectors[rows],
    )


# ----------------------------------------------------------------------------- loading


def validate(index: Index) -> None:
    """The invariants `vqlib.load` checks on an Index it rebuilds; ValueError naming the field."""
    _checks.check_metric(index.metric)
    if index.centroids.ndim != 2 or index.centroids.shape[0] < 1 or index.centroids.dtype != jnp.float32:
        raise ValueError(
            f"centroids must be float32 (nlist, d) with nlist >= 1, got {index.centroids.dtype} {index.centroids.shape}"
        )
    _checks.check_finite(index.centroids, "centroids")
    if index.method != "flat" and index.method not in methods():
        raise ValueError(f"method {index.method!r} is not 'flat' or a registered vqlib.fit method")
    if index.codebook is not None:
        validate_codebook(index.codebook, "codebook")
    empty_index(index.centroids, index.codebook, index.metric, index.fast_scan, False, index.method)  # d, fast-scan
    if index.offsets.dtype != jnp.int32 or index.live.dtype != jnp.bool_:
        raise ValueError(f"offsets must be int32 and live bool, got {index.offsets.dtype} and {index.live.dtype}")
    n = index.data.shape[0]
    offsets = np.asarray(index.offsets)
    if offsets.shape != (index.nlist + 1,) or offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 0):
        raise ValueError(f"offsets must rise from 0 to the {n} rows, one per list boundary; got {offsets[:8]}...")
    if np.any(offsets % BLOCK):
        raise ValueError(f"offsets must be multiples of the {BLOCK}-row block")
    ids = np.asarray(index.ids)
    if ids.shape != (n,) or index.live.shape != (n,) or ids.dtype != np.int64:
        raise ValueError(
            f"ids (int64) and live must have one entry per row ({n}), got {ids.shape} and {index.live.shape}"
        )
    stored = ids[ids >= 0]
    if np.any(ids < -1) or np.unique(stored).size != stored.size:
        raise ValueError("ids must be unique and non-negative (-1 on padding rows)")
    if np.any(np.asarray(index.live) & (ids < 0)):
        raise ValueError("a padding row (id -1) is marked live")
    expected = index.dim if index.codebook is None else -(-code_width(index) * pack_bits(index) // 8)
    if index.data.ndim != 2 or index.data.shape[1] != expected:
        raise ValueError(f"data must have {expected} columns per row for this codebook, got shape {index.data.shape}")
    if index.codebook is not None:
        codes = np.asarray(row_codes(index, index.data))
        if codes.size and codes.max() >= code_layout(index.codebook).num_codes:
            raise ValueError(
                f"data holds codes up to {codes.max()}, the codebook has {code_layout(index.codebook).num_codes}"
            )
    if (index.bias is not None) != stores_bias(index.codebook, index.metric):
        raise ValueError("bias must be present exactly when the codebook's L2 tables need it")
    for name, shape in (("bias", (n,)), ("vectors", (n, index.dim))):
        column = getattr(index, name)
        if column is not None:
            if column.shape != shape or column.dtype != jnp.float32:
                raise ValueError(f"{name} must be float32 of shape {shape} (one per data row), got {column.shape}")
            _checks.check_finite(column, name)


VALIDATORS[Index] = validate
