"""Search over a database split across the devices of a `jax.sharding.Mesh`.

Each device holds one shard of the rows (row r of the index goes to shard r mod S, so every
shard has a share of every list, in list order) with its own CSR offsets; centroids and codebook are replicated. Under `jax.shard_map` each device
searches its shard, the per-shard top-k are all-gathered and merged into the global top k.
Re-ranking merges the per-shard candidate lists first, so each device re-scores exactly the
candidates the single-device search would, and the result equals it.

Multi-host: start every process with `jax.distributed.initialize()`, build the mesh over
`jax.devices()` (all hosts' devices) and call `shard` and `search` on every process with the
same index and queries; each process then holds only its own devices' shards.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vqlib.retrieval import _search
from vqlib.retrieval._index import Index, row_lists


@dataclasses.dataclass(frozen=True)
class ShardedIndex:
    """An Index whose rows are split over a mesh axis (see `shard`); searched with `search`.

    Attributes:
        template: the Index with its rows removed (settings, centroids, codebook).
        parts: per-shard arrays stacked on a leading axis of size S, sharded over `axis`.
        vectors: (S, rows, d) raw vectors for re-ranking, or None.
        ids: (S * rows,) int64: the id of each shard row, -1 for padding.
        live_count: live vectors in all shards.
        mesh, axis: where the shards live.
    """

    template: Index
    parts: _search.Parts
    vectors: jax.Array | None
    ids: np.ndarray
    live_count: int
    mesh: Mesh
    axis: str


def shard(index: Index, mesh: Mesh, axis: str | None = None) -> ShardedIndex:
    """Splits the rows of `index` over the devices along `axis` of `mesh` (default: its first axis).

    Example:
        >>> import jax, numpy as np, vqlib
        >>> from jax.sharding import Mesh
        >>> x = np.random.default_rng(0).normal(size=(300, 8)).astype("float32")
        >>> mesh = Mesh(np.array(jax.devices()), ("data",))
        >>> sharded = vqlib.retrieval.shard(vqlib.retrieval.build(x, "flat"), mesh)
        >>> vqlib.retrieval.search(sharded, x[:1], k=1)[1].tolist()
        [[0]]
    """
    if not isinstance(index, Index):
        raise TypeError(f"index must be a vqlib.retrieval.Index, got {type(index).__name__}")
    axis = mesh.axis_names[0] if axis is None else axis
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh, which has {mesh.axis_names}")
    num = mesh.shape[axis]
    n = index.data.shape[0]
    rows_per = max(1, -(-n // num))
    lists = np.asarray(row_lists(index.offsets, n))
    live = np.asarray(index.live)
    data, offsets, lives, vectors, ids = [], [], [], [], []
    for s in range(num):
        take = np.arange(s, n, num)
        pad = rows_per - take.size
        data.append(np.pad(np.asarray(index.data)[take], ((0, pad), (0, 0))))
        counts = np.bincount(lists[take], minlength=index.nlist)
        offsets.append(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        lives.append(np.pad(live[take], (0, pad)))
        ids.append(np.pad(index.ids[take], (0, pad), constant_values=-1))
        if index.vectors is not None:
            vectors.append(np.pad(np.asarray(index.vectors)[take], ((0, pad), (0, 0))))
    split = NamedSharding(mesh, PartitionSpec(axis))
    put = functools.partial(jax.device_put, device=split)
    whole = NamedSharding(mesh, PartitionSpec())
    parts = _search.Parts(
        jax.device_put(index.centroids, whole),
        jax.device_put(index.codebook, whole),
        put(np.stack(data)),
        put(np.stack(offsets)),
        put(np.stack(lives)),
    )
    template = dataclasses.replace(
        index,
        data=index.data[:0],
        offsets=jnp.zeros_like(index.offsets),
        ids=index.ids[:0],
        live=index.live[:0],
        vectors=None if index.vectors is None else index.vectors[:0],
    )
    stacked_vectors = put(np.stack(vectors)) if vectors else None
    return ShardedIndex(template, parts, stacked_vectors, np.concatenate(ids), int(live.sum()), mesh, axis)


def _merge(dists, rows, k: int, axis: str):
    """All-gathers the per-shard (q, k') results and keeps the k best: (q, k) each."""
    all_d = jnp.moveaxis(lax.all_gather(dists, axis), 0, 1).reshape(dists.shape[0], -1)
    all_r = jnp.moveaxis(lax.all_gather(rows, axis), 0, 1).reshape(rows.shape[0], -1)
    neg, pick = lax.top_k(-all_d, k)
    return -neg, jnp.take_along_axis(all_r, pick, axis=1)


def _local(parts, vectors, queries, *, s, k, nprobe, full, budget, rerank, axis):
    """One device: search its shard, merge over the axis (re-rank on the merged candidates)."""
    parts = _search.Parts(parts.centroids, parts.codebook, parts.data[0], parts.offsets[0], parts.live[0])
    rows_per = parts.data.shape[0]
    base = lax.axis_index(axis) * rows_per
    dists, rows = _search.approximate(parts, queries, s, k=rerank or k, nprobe=nprobe, full=full, budget=budget)
    dists, rows = _merge(dists, jnp.where(rows >= 0, rows + base, -1), rerank or k, axis)
    if rerank:
        mine = (rows >= base) & (rows < base + rows_per)
        local_rows = jnp.where(mine, rows - base, -1)
        dists, local_rows = _search.rerank_exact(vectors[0], queries, local_rows, metric=s.metric, k=k)
        dists, rows = _merge(dists, jnp.where(local_rows >= 0, local_rows + base, -1), k, axis)
    return dists, jnp.where(jnp.isfinite(dists), rows, -1)


@functools.partial(jax.jit, static_argnames=("s", "k", "nprobe", "full", "budget", "rerank", "mesh", "axis"))
def _search_sharded(parts, vectors, queries, *, mesh, axis, **options):
    split, whole = PartitionSpec(axis), PartitionSpec()
    parts_spec = _search.Parts(whole, whole, split, split, split)
    return jax.shard_map(
        functools.partial(_local, axis=axis, **options),
        mesh=mesh,
        in_specs=(parts_spec, split, whole),
        out_specs=(whole, whole),
        check_vma=False,
    )(parts, vectors, queries)


def search_sharded(index: ShardedIndex, queries, k: int, *, nprobe: int, rerank: int | None):
    """`vqlib.retrieval.search` for a ShardedIndex; same results as the unsharded index."""
    t = index.template
    queries, k, nprobe, rerank = _search.check_search(t, queries, k, nprobe, rerank, live=index.live_count)
    full = _search.full_scan(t, nprobe)
    budget = None
    if not full:
        probes = _search.probe(t.centroids, queries, nprobe=nprobe)
        budget = max(_search.candidate_budget(index.parts.offsets, probes), rerank or k)
    dists, rows = _search_sharded(
        index.parts,
        index.vectors,
        queries,
        mesh=index.mesh,
        axis=index.axis,
        s=_search._static(t),
        k=k,
        nprobe=nprobe,
        full=full,
        budget=budget,
        rerank=rerank,
    )
    return _search.finish(t.metric, dists, rows, index.ids)
