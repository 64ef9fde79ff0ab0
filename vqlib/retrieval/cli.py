"""`python -m vqlib index build|search|info`: ANN indexes from .npy files on the command line."""

from __future__ import annotations

import argparse
import time

import numpy as np

from vqlib import _io
from vqlib._types import METRICS
from vqlib.retrieval._index import KINDS, Index, build, bytes_per_vector
from vqlib.retrieval._search import search


def add_parser(sub) -> None:
    """Adds the `index` command and its sub-commands to an argparse sub-parser set."""
    p = sub.add_parser("index", help="build, search or describe an ANN index (.npy in, .vq out)")
    cmds = p.add_subparsers(dest="index_command", required=True)
    b = cmds.add_parser("build", help="train an index on an (n, d) .npy matrix and add its rows")
    b.add_argument("data", help="(n, d) float .npy file (read memory-mapped)")
    b.add_argument("-o", "--output", required=True, help="index file to write (atomically)")
    b.add_argument(
        "--type", default="ivfpq", help=f"index kind ({', '.join(KINDS)}) or a vqlib.fit method (default ivfpq)"
    )
    b.add_argument("--metric", default="l2", choices=METRICS)
    b.add_argument("--nlist", type=int, default=None, help="coarse lists (ivf kinds; default ~4 sqrt(n))")
    b.add_argument("--m", type=int, default=None, help="codes per vector (PQ, RVQ, AQ)")
    b.add_argument("--k", type=int, default=None, help="codes per codebook (PQ, RVQ, AQ; default 256)")
    b.add_argument("--bits", type=int, default=None, help="TurboQuant bits per coordinate (tq; 1 = sign codes)")
    b.add_argument("--ids", default=None, help="(n,) int64 .npy file of ids (default 0..n-1)")
    b.add_argument("--keep-vectors", action="store_true", help="store raw vectors for --rerank")
    b.add_argument("--seed", type=int, default=0)
    s = cmds.add_parser("search", help="k nearest neighbours of each row of a .npy query matrix")
    s.add_argument("index", help="index file from `index build`")
    s.add_argument("queries", help="(q, d) float .npy file")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--nprobe", type=int, default=1)
    s.add_argument("--rerank", type=int, default=None, help="re-score this many candidates exactly")
    s.add_argument("-o", "--output", default=None, help=".npz file for the results (scores, ids)")
    i = cmds.add_parser("info", help="describe an index file")
    i.add_argument("index")


def _load_index(path: str) -> Index:
    return _io.load(path, expect=Index)


def run(args: argparse.Namespace) -> None:
    import jax

    if args.index_command == "build":
        x = np.load(args.data, mmap_mode="r")
        ids = None if args.ids is None else np.load(args.ids)
        start = time.perf_counter()
        options = {name: getattr(args, name) for name in ("m", "k", "bits") if getattr(args, name) is not None}
        index = build(
            np.asarray(x),
            args.type,
            metric=args.metric,
            nlist=args.nlist,
            ids=ids,
            keep_vectors=args.keep_vectors or None,
            key=jax.random.key(args.seed),
            progress=True,
            **options,
        )
        _io.save(args.output, index)
        print(f"built {_describe(index)} in {time.perf_counter() - start:.1f} s -> {args.output}")
    elif args.index_command == "search":
        index = _load_index(args.index)
        queries = np.load(args.queries)
        start = time.perf_counter()
        scores, ids = search(index, queries, args.k, nprobe=args.nprobe, rerank=args.rerank)
        seconds = time.perf_counter() - start
        if args.output:
            np.savez(args.output, scores=scores, ids=ids)
            print(f"{len(queries)} queries in {seconds:.2f} s -> {args.output}")
        else:
            for row_ids, row_scores in zip(ids, scores, strict=True):
                print(" ".join(f"{i}:{s:.4g}" for i, s in zip(row_ids, row_scores, strict=True)))
    else:
        print(_describe(_load_index(args.index)))


def _describe(index: Index) -> str:
    return (
        f"{index.kind} index, metric {index.metric}, {index.ntotal} vectors of d={index.dim}, "
        f"nlist={index.nlist}, {bytes_per_vector(index)} bytes per vector"
        + (", raw vectors kept for re-ranking" if index.vectors is not None else "")
    )
