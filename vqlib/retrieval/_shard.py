"""Search over a database split across the devices of a `jax.sharding.Mesh`.

Each device holds one shard of the rows (the stored rows go round-robin to the S shards, so
every shard has a share of every list) in the same block layout as an Index, with its own
offsets; centroids and codebook are replicated. Under `jax.shard_map` each device searches its
shard, the per-shard top-k are all-gathered and merged into the global top k. Re-ranking
merges the per-shard candidates first, so each device re-scores exactly the candidates the
single-device search would. Results equal the single-device ones up to the order of equal scores.

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

from vqlib.retrieval._index import Index
from vqlib.retrieval._lists import BLOCK, block_layout, row_lists, take_rows
from vqlib.retrieval._plan import approximate, check_search, finish, full_scan, probed_blocks, round_budget
from vqlib.retrieval._rerank import rerank_exact
from vqlib.retrieval._scan_lists import probe
from vqlib.retrieval._scoring import Parts, static_of


@dataclasses.dataclass(frozen=True)
class ShardedIndex:
    """An Index whose rows are split over a mesh axis (see `shard`); searched with `search`.

    Attributes:
        template: the Index with its rows removed (settings, centroids, codebook).
        parts: per-shard arrays stacked on a leading axis of size S, sharded over `axis`.
        vectors: (S, rows, d) raw vectors for re-ranking, or None.
        ids: (S * rows,) int64: the id of each shard row, -1 for padding.
        offsets: (S, nlist + 1) int32 on the host: each shard's list offsets (a process reads
            them without touching the other processes' devices).
        live_count: live vectors in all shards.
        mesh, axis: where the shards live.
    """

    template: Index
    parts: Parts
    vectors: jax.Array | None
    ids: np.ndarray
    offsets: np.ndarray
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
    stored = np.flatnonzero(index.ids >= 0)  # rows holding vectors (live or deleted), not padding
    lists = np.asarray(row_lists(index.offsets, index.data.shape[0]))
    columns = dict(data=np.asarray(index.data), live=np.asarray(index.live), ids=index.ids)
    for name in ("bias", "vectors"):
        if getattr(index, name) is not None:
            columns[name] = np.asarray(getattr(index, name))
    shards, offsets = [], []
    for s in range(num):
        take = stored[s::num]
        source, offs = block_layout(lists[take], index.nlist)
        shards.append({name: take_rows(col[take], source, -1 if name == "ids" else 0) for name, col in columns.items()})
        offsets.append(offs)
    rows_per = max(BLOCK, max(int(o[-1]) for o in offsets))

    def stack(name):  # shards padded to rows_per rows (dead, id -1) and stacked
        return np.stack(
            [
                np.pad(
                    sh[name],
                    [(0, rows_per - len(sh[name]))] + [(0, 0)] * (sh[name].ndim - 1),
                    constant_values=-1 if name == "ids" else 0,
                )
                for sh in shards
            ]
        )

    split = NamedSharding(mesh, PartitionSpec(axis))
    put = functools.partial(jax.device_put, device=split)
    whole = NamedSharding(mesh, PartitionSpec())
    parts = Parts(
        jax.device_put(index.centroids, whole),
        jax.device_put(index.codebook, whole),
        put(stack("data")),
        None if index.bias is None else put(stack("bias")),
        put(np.stack(offsets)),
        put(stack("live")),
    )
    template = dataclasses.replace(
        index,
        data=index.data[:0],
        bias=None if index.bias is None else index.bias[:0],
        offsets=jnp.zeros_like(index.offsets),
        ids=index.ids[:0],
        live=index.live[:0],
        vectors=None if index.vectors is None else index.vectors[:0],
    )
    vectors = None if index.vectors is None else put(stack("vectors"))
    host_offsets = np.stack(offsets)
    return ShardedIndex(template, parts, vectors, stack("ids").reshape(-1), host_offsets, index.ntotal, mesh, axis)


def _merge(dists, rows, k: int, axis: str):
    """All-gathers the per-shard (q, k') results and keeps the k best: (q, k) each."""
    all_d = jnp.moveaxis(lax.all_gather(dists, axis), 0, 1).reshape(dists.shape[0], -1)
    all_r = jnp.moveaxis(lax.all_gather(rows, axis), 0, 1).reshape(rows.shape[0], -1)
    neg, pick = lax.top_k(-all_d, k)
    return -neg, jnp.take_along_axis(all_r, pick, axis=1)


def _local(parts, vectors, queries, probes, *, s, k, nprobe, full, budget, rerank, axis):
    """One device: search its shard, merge over the axis (re-rank on the merged candidates)."""
    parts = Parts(
        parts.centroids,
        parts.codebook,
        parts.data[0],
        None if parts.bias is None else parts.bias[0],
        parts.offsets[0],
        parts.live[0],
    )
    rows_per = parts.data.shape[0]
    base = lax.axis_index(axis) * rows_per
    dists, rows = approximate(parts, queries, s, k=rerank or k, nprobe=nprobe, full=full, probes=probes, budget=budget)
    dists, rows = _merge(dists, jnp.where(rows >= 0, rows + base, -1), rerank or k, axis)
    if rerank:
        mine = (rows >= base) & (rows < base + rows_per)
        local_rows = jnp.where(mine, rows - base, -1)
        dists, local_rows = rerank_exact(vectors[0], queries, local_rows, l2=s.l2, k=k)
        dists, rows = _merge(dists, jnp.where(local_rows >= 0, local_rows + base, -1), k, axis)
    return dists, jnp.where(jnp.isfinite(dists), rows, -1)


@functools.partial(jax.jit, static_argnames=("s", "k", "nprobe", "full", "budget", "rerank", "mesh", "axis"))
def _search_sharded(parts, vectors, queries, probes, *, mesh, axis, **options):
    split, whole = PartitionSpec(axis), PartitionSpec()
    parts_spec = Parts(whole, whole, split, None if parts.bias is None else split, split, split)
    return jax.shard_map(
        functools.partial(_local, axis=axis, **options),
        mesh=mesh,
        in_specs=(parts_spec, split, whole, whole),
        out_specs=(whole, whole),
        check_vma=False,
    )(parts, vectors, queries, probes)


def search_sharded(index: ShardedIndex, queries, k: int, *, nprobe: int, rerank: int | None):
    """`vqlib.retrieval.search` for a ShardedIndex; same results as the unsharded index."""
    t = index.template
    queries, k, nprobe, rerank = check_search(t, queries, k, nprobe, rerank, live=index.live_count)
    if queries.shape[0] == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    full = full_scan(t, nprobe)
    probes, budget = None, None
    if not full:  # one coarse search for all devices; the largest shard's candidate count fixes the budget
        probes = probe(t.centroids, queries, nprobe=nprobe)
        budget = round_budget(int(probed_blocks(index.offsets, np.asarray(probes)).max()))
    dists, rows = _search_sharded(
        index.parts,
        index.vectors,
        queries,
        probes,
        mesh=index.mesh,
        axis=index.axis,
        s=static_of(t),
        k=k,
        nprobe=nprobe,
        full=full,
        budget=budget,
        rerank=rerank,
    )
    return finish(t, dists, rows, index.ids)
