"""`python -m vqlib index build|search|info`: ANN indexes from .npy files on the command line.

User mistakes (a missing or unreadable file, an option the index kind needs, a bad value) raise
ValueError / TypeError / OSError with a one-line message; `vqlib.__main__` prints it and exits 2.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from vqlib import _io
from vqlib._cli import check_output, print_json, read_npy
from vqlib._types import METRICS
from vqlib.retrieval._index import KINDS, Index, _check_ids, build, bytes_per_vector
from vqlib.retrieval._search import search

# methods whose fit needs m, and whether m must divide d (PQ subspaces) or counts stages (RVQ, AQ)
_NEEDS_M = {"pq": True, "opq": True, "rvq": False, "aq": False}


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
    b.add_argument(
        "--metric",
        default="l2",
        choices=METRICS,
        help="l2: squared distances; ip: inner products; cos: cosine (default l2)",
    )
    b.add_argument("--nlist", type=int, default=None, help="coarse lists (ivf kinds; default ~4 sqrt(n))")
    b.add_argument(
        "--m",
        type=int,
        default=None,
        help="codes per vector (PQ: default the divisor of d nearest d/4, i.e. d/4 bytes per vector at 8-bit "
        "codes; fast-scan: the even divisor nearest d/2; RVQ, AQ: required)",
    )
    b.add_argument("--k", type=int, default=None, help="codes per codebook (PQ, RVQ, AQ; default 256)")
    b.add_argument("--bits", type=int, default=None, help="TurboQuant bits per coordinate (tq; 1 = sign codes)")
    b.add_argument("--ids", default=None, help="(n,) int64 .npy file of ids (default 0..n-1)")
    b.add_argument("--keep-vectors", action="store_true", help="store raw vectors for --rerank")
    b.add_argument("--seed", type=int, default=0, help="seed of the training (default 0)")
    b.add_argument("--json", action="store_true", help="print a JSON summary (kind, sizes, seconds) instead")
    s = cmds.add_parser("search", help="k nearest neighbours of each row of a .npy query matrix")
    s.add_argument("index", help="index file from `index build`")
    s.add_argument("queries", help="(q, d) float .npy file")
    s.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    s.add_argument("--nprobe", type=int, default=1, help="lists searched per query (ivf kinds; default 1)")
    s.add_argument("--rerank", type=int, default=None, help="re-score this many candidates exactly")
    s.add_argument("-o", "--output", default=None, help=".npz file for the results (scores, ids)")
    s.add_argument("--json", action="store_true", help="print the results as JSON (ids, scores, seconds) instead")
    i = cmds.add_parser("info", help="describe an index file")
    i.add_argument("index", help="index file from `index build`")
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(run=run)


def default_m(d: int, *, fast_scan: bool) -> int | None:
    """PQ codes per vector when --m is not given: d/4 bytes per vector, a 16x reduction from
    float32. 8-bit codes (k=256): the divisor of d nearest d/4 (4 dimensions per code); fast-scan's
    4-bit codes: the even divisor of d nearest d/2 (None when d is odd: fast-scan needs even m)."""
    target = d / 2 if fast_scan else d / 4
    divisors = [m for m in range(1, d + 1) if d % m == 0 and (m % 2 == 0 or not fast_scan)]
    return min(divisors, key=lambda m: (abs(m - target), m)) if divisors else None


def _fit_options(args: argparse.Namespace, d: int) -> dict:
    """The codebook options from the command line, with the default m where the kind needs one."""
    options = {name: getattr(args, name) for name in ("m", "k", "bits") if getattr(args, name) is not None}
    method, _, implied = KINDS.get(args.type, (args.type, False, {}))
    if method in _NEEDS_M and "m" not in options:
        if not _NEEDS_M[method]:
            raise ValueError(
                f"--type {args.type} needs --m, the number of codebooks per vector (one byte each at the default "
                "k=256), e.g. --m 8"
            )
        fast_scan = bool(implied.get("fast_scan"))
        m = default_m(d, fast_scan=fast_scan)
        if m is None:
            raise ValueError(f"--type {args.type} needs an even --m dividing d={d}, and d is odd; use --type ivfpq")
        options["m"] = m
    return options


def run(args: argparse.Namespace) -> None:
    import jax

    if args.index_command == "build":
        check_output(args.output, "index")
        x = read_npy(args.data, "data", 2)
        ids = None
        if args.ids is not None:  # checked before training, which can take long
            ids = _check_ids(np.asarray(read_npy(args.ids, "ids", 1)), x.shape[0], np.empty(0, np.int64))
        options = _fit_options(args, x.shape[1])
        start = time.perf_counter()
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
        seconds = time.perf_counter() - start
        if args.json:
            print_json(dict(_info(index), output=args.output, seconds=seconds))
        else:
            print(f"built {_describe(index)} in {seconds:.1f} s -> {args.output}")
    elif args.index_command == "search":
        if args.output:
            check_output(args.output, "results")
        index = _load_index(args.index)
        queries = np.asarray(read_npy(args.queries, "queries", 2))
        start = time.perf_counter()
        scores, ids = search(index, queries, args.k, nprobe=args.nprobe, rerank=args.rerank)
        seconds = time.perf_counter() - start
        if args.output:
            np.savez(args.output, scores=scores, ids=ids)
        if args.json:
            out = dict(queries=len(queries), k=args.k, seconds=seconds, output=args.output)
            if not args.output:
                out.update(ids=np.asarray(ids).tolist(), scores=np.asarray(scores).tolist())
            print_json(out)
        elif args.output:
            print(f"{len(queries)} queries in {seconds:.2f} s -> {args.output}")
        else:
            for row_ids, row_scores in zip(ids, scores, strict=True):
                print(" ".join(f"{i}:{s:.4g}" for i, s in zip(row_ids, row_scores, strict=True)))
    else:
        index = _load_index(args.index)
        if args.json:
            print_json(_info(index))
        else:
            print(_describe(index))


def _info(index: Index) -> dict:
    return dict(
        kind=index.kind,
        metric=index.metric,
        ntotal=int(index.ntotal),
        d=int(index.dim),
        nlist=int(index.nlist),
        bytes_per_vector=int(bytes_per_vector(index)),
        vectors_kept=index.vectors is not None,
    )


def _load_index(path: str) -> Index:
    if not os.path.exists(path):
        raise ValueError(f"index file {path} does not exist; build one with `python -m vqlib index build`")
    return _io.load(path, expect=Index)


def _describe(index: Index) -> str:
    return (
        f"{index.kind} index, metric {index.metric}, {index.ntotal} vectors of d={index.dim}, "
        f"nlist={index.nlist}, {bytes_per_vector(index)} bytes per vector"
        + (", raw vectors kept for re-ranking" if index.vectors is not None else "")
    )
