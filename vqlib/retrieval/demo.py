"""`vqlib demo`: vqlib and faiss-cpu side by side on the same generated data, in three tables.

1. k-means: exact Lloyd from the same k-means++ seeds (fit time, MSE / data variance).
2. Codebooks at about `m` bytes per vector: PQ and RVQ against faiss's ProductQuantizer and
   ResidualQuantizer, data-oblivious TurboQuant against faiss's 4-bit ScalarQuantizer.
3. An IVF-PQ index against faiss's IndexIVFPQ (build time, queries per second, recall@10).

Bytes per vector are what each code stores, side data included (TurboQuant's float16 norm).
vqlib's fit and encode times are one call each, so they include JAX's compilation (a
compiled call is faster: benchmarks/RESULTS.md); the k-means table shows both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import NamedTuple

import numpy as np

from vqlib import codebooks
from vqlib._progress import steps
from vqlib._version import __version__
from vqlib.retrieval._index import build, bytes_per_vector
from vqlib.retrieval._search import search


class Size(NamedTuple):
    n: int  # vectors
    d: int  # dimension
    k: int  # k-means clusters
    m: int  # bytes per vector of PQ / RVQ / IVF-PQ (m codes of 8 bits)
    iters: int  # Lloyd iterations
    queries: int  # held-out queries of the index table


SIZES = {
    "small": Size(n=20_000, d=64, k=256, m=8, iters=20, queries=1_000),  # about a minute on 2 cores
    "full": Size(n=200_000, d=128, k=1_024, m=16, iters=20, queries=1_000),  # several minutes
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="vqlib and faiss-cpu side by side: k-means, PQ / RVQ / TurboQuant codebooks, an IVF-PQ index",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--size",
        choices=tuple(SIZES),
        default="small",
        help="small: 20,000 x 64, k=256, 8 bytes per vector (default, about a minute on 2 cores); "
        "full: 200,000 x 128, k=1,024, 16 bytes per vector (several minutes)",
    )
    p.add_argument("--n", type=int, default=None, help="number of generated vectors (overrides the size's n)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data and of every fit (default 0)")
    p.add_argument("--json", action="store_true", help="print the tables as one JSON document instead")
    p.set_defaults(run=run)


# ----------------------------------------------------------------------------- the three tables


def _relative(x, x_hat, variance: float) -> float:
    """MSE / data variance: mean ||x - x_hat||^2 over E||x - mean(x)||^2 (0 = exact, 1 = the mean)."""
    diff = np.asarray(x, np.float64) - np.asarray(x_hat, np.float64)
    return float(np.mean(np.sum(diff * diff, axis=1)) / variance)


def _timed(fn, *args, **kwargs):
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def kmeans_rows(x, size: Size, variance: float, seed: int, step) -> list[dict]:
    """Exact Lloyd from the same k-means++ seeds: vqlib's first call, its compiled call, faiss."""
    import faiss
    import jax

    step("k-means: k-means++ seeds (shared by both libraries)")
    seeds = np.asarray(codebooks.fit(x, "kmeans", k=size.k, max_iter=0, key=jax.random.key(seed)).centroids)
    rows, nbytes = [], int(np.ceil(np.log2(size.k) / 8))
    for label in ("vqlib (first call: compile + fit)", "vqlib (compiled)"):
        step(f"k-means: {label}")
        cb, seconds = _timed(codebooks.fit, x, "kmeans", k=size.k, init=seeds, max_iter=size.iters, tol=0.0)
        codes = codebooks.encode(cb, x)
        rows.append(
            dict(method=label, bytes=nbytes, seconds=seconds, relative_mse=_relative(x, cb.centroids[codes], variance))
        )
    step("k-means: faiss-cpu Kmeans")
    km = faiss.Kmeans(x.shape[1], size.k, niter=size.iters, max_points_per_centroid=10**9, seed=seed + 1)
    start = time.perf_counter()
    km.train(x, init_centroids=seeds)
    seconds = time.perf_counter() - start
    codes = km.index.search(x, 1)[1][:, 0]
    rows.append(
        dict(
            method="faiss-cpu Kmeans",
            bytes=nbytes,
            seconds=seconds,
            relative_mse=_relative(x, km.centroids[codes], variance),
        )
    )
    return rows


def codebook_rows(x, size: Size, variance: float, seed: int, step) -> list[dict]:
    """PQ, RVQ and TurboQuant codebooks: fit once, encode and decode all rows."""
    import faiss
    import jax

    d, m, rows = x.shape[1], size.m, []
    key = jax.random.key(seed)
    tq_bits = max(1, round(8 * m / d))  # TurboQuant at about m bytes (plus its norm)
    ours = [
        (f"vqlib PQ {m}x8", "pq", dict(m=m)),
        (f"vqlib RVQ {m}x8, beam 4", "rvq", dict(m=m, beam=4)),
        (f"vqlib TurboQuant {tq_bits} bit/dim + f16 norm", "turboquant", dict(bits=tq_bits)),
        ("vqlib TurboQuant 4 bits/dim + f16 norm", "turboquant", dict(bits=4)),
    ]
    rq = faiss.ResidualQuantizer(d, m, 8)
    rq.max_beam_size = 4
    theirs = [
        (f"faiss-cpu ProductQuantizer {m}x8", faiss.ProductQuantizer(d, m, 8)),
        (f"faiss-cpu ResidualQuantizer {m}x8, beam 4", rq),
        ("faiss-cpu ScalarQuantizer 4 bits/dim", faiss.ScalarQuantizer(d, faiss.ScalarQuantizer.QT_4bit)),
    ]
    order = [ours[0], theirs[0], ours[1], theirs[1], ours[2], ours[3], theirs[2]]  # peers side by side
    for label, *spec in order:
        step(f"codebooks: {label}")
        if len(spec) == 2:
            method, options = spec
            cb, fit_s = _timed(codebooks.fit, x, method, key=key, **options)
            codes, encode_s = _timed(codebooks.encode, cb, x)
            x_hat = codebooks.decode(cb, codes)
            nbytes = codebooks.code_layout(cb).bits_per_vector / 8
        else:
            (q,) = spec
            start = time.perf_counter()
            q.train(x)
            fit_s = time.perf_counter() - start
            start = time.perf_counter()
            codes = q.compute_codes(x)
            encode_s = time.perf_counter() - start
            x_hat = q.decode(codes)
            nbytes = q.code_size
        rows.append(
            dict(method=label, bytes=nbytes, seconds=fit_s, encode=encode_s, relative_mse=_relative(x, x_hat, variance))
        )
    return rows


def index_rows(x, size: Size, seed: int, step, nprobe: int = 16) -> list[dict]:
    """IVF-PQ at m bytes per vector; the first `queries` rows are the held-out queries."""
    import faiss
    import jax

    queries, base = x[: size.queries], x[size.queries :]
    d, m = x.shape[1], size.m
    nlist = int(np.sqrt(len(base)))  # about sqrt(n) lists, 140 at the small size
    step("index: exact neighbours (faiss IndexFlatL2)")
    exact = faiss.IndexFlatL2(d)
    exact.add(base)
    truth = exact.search(queries, 10)[1]

    def recall(ids) -> float:
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(np.asarray(ids), truth, strict=True)]))

    step(f"index: vqlib IVF{nlist},PQ{m} build")
    index, build_s = _timed(build, base, "ivfpq", nlist=nlist, m=m, key=jax.random.key(seed))
    step(f"index: vqlib IVF{nlist},PQ{m} search")
    search(index, queries, k=10, nprobe=nprobe)  # the first call compiles: not timed
    (_, ids), search_s = _timed(search, index, queries, k=10, nprobe=nprobe)
    rows = [
        dict(
            method=f"vqlib IVF{nlist},PQ{m}",
            bytes=bytes_per_vector(index),
            build=build_s,
            qps=len(queries) / search_s,
            recall=recall(ids),
        )
    ]
    step(f"index: faiss-cpu IVF{nlist},PQ{m} build and search")
    start = time.perf_counter()
    peer = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, nlist, m, 8)
    peer.train(base)
    peer.add(base)
    build_s = time.perf_counter() - start
    peer.nprobe = nprobe
    start = time.perf_counter()
    ids = peer.search(queries, 10)[1]
    search_s = time.perf_counter() - start
    rows.append(
        dict(
            method=f"faiss-cpu IVF{nlist},PQ{m}",
            bytes=peer.code_size,
            build=build_s,
            qps=len(queries) / search_s,
            recall=recall(ids),
        )
    )
    return rows


# ----------------------------------------------------------------------------- printing

_NUM_STEPS = 1 + 4 + 7 + 4  # data, k-means, codebooks, index: one `step` call each


def _format(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A fixed-width table; columns are (key, header, format)."""
    width = max(36, *(len(r["method"]) for r in rows))
    lines = [f"{'method':<{width}}" + "".join(f" {h:>10}" for _, h, _ in columns)]
    for r in rows:
        lines.append(f"{r['method']:<{width}}" + "".join(f" {format(r[c], f):>10}" for c, _, f in columns))
    return "\n".join(lines)


def _faiss_version() -> str:
    try:
        import faiss
    except ImportError as e:  # a regular dependency: only a broken install lands here
        raise OSError(
            f"the demo compares against faiss-cpu, which does not import ({e}); pip install faiss-cpu"
        ) from None
    return faiss.__version__


def run(args) -> None:
    import jax

    from vqlib.testing import clustered

    faiss_version = _faiss_version()
    size = SIZES[args.size]
    if args.n is not None:
        if args.n < size.queries + size.k or args.n < 1_000:
            raise ValueError(f"--n {args.n} is too small for the demo; use --n >= {max(1_000, size.queries + size.k)}")
        size = size._replace(n=args.n)
    bar = steps(_NUM_STEPS, desc="vqlib demo", enabled=not args.json)
    started = time.perf_counter()

    started_steps = []

    def step(what: str) -> None:  # the previous step is done; `what` starts
        if started_steps:
            bar.update(1)
        started_steps.append(what)
        bar.set_description(what)

    def emit(text: str) -> None:
        if not args.json:
            bar.clear()
            print(text, flush=True)
            bar.refresh()

    emit(
        f"vqlib {__version__} (jax {jax.__version__} on {jax.devices()[0].platform}) against faiss-cpu "
        f"{faiss_version}; {size.n:,} x {size.d} generated vectors "
        f"(vqlib.testing.clustered: {4 * size.k} clusters on a 16-dim subspace, seed {args.seed})"
    )
    step("data: generating")
    x = np.asarray(clustered(jax.random.key(args.seed), size.n, size.d, num_clusters=4 * size.k, intrinsic_dim=16))
    variance = float(np.mean(np.sum((x - x.mean(0)) ** 2, axis=1), dtype=np.float64))
    result = dict(
        meta=dict(size=args.size, **size._asdict(), seed=args.seed, variance=variance, vqlib=__version__),
    )
    emit(
        "Relative error = MSE / data variance (0 is exact, 1 is no better than the mean). "
        "vqlib's seconds include JAX compilation (one call each) unless a row says compiled."
    )

    result["kmeans"] = kmeans_rows(x, size, variance, args.seed, step)
    emit(
        f"\nk-means, k={size.k}: {size.iters} exact Lloyd iterations from the same k-means++ seeds\n"
        + _format(
            result["kmeans"],
            [("bytes", "bytes/vec", "d"), ("seconds", "fit s", ".2f"), ("relative_mse", "rel. err", ".5f")],
        )
    )
    result["codebooks"] = codebook_rows(x, size, variance, args.seed, step)
    emit(
        f"\ncodebooks at about {size.m} bytes per vector (bytes/vec: each code as stored, norms included); "
        f"fit on all {size.n:,} rows, then encode and decode them\n"
        + _format(
            result["codebooks"],
            [
                ("bytes", "bytes/vec", "g"),
                ("seconds", "fit s", ".2f"),
                ("encode", "encode s", ".2f"),
                ("relative_mse", "rel. err", ".4f"),
            ],
        )
    )
    result["index"] = index_rows(x, size, args.seed, step)
    emit(
        f"\nANN index: {size.n - size.queries:,} vectors, {size.queries:,} held-out queries, nprobe 16, recall@10 "
        "against exact search (build: train + add; queries/s: one batch, after a first call that compiles)\n"
        + _format(
            result["index"],
            [
                ("bytes", "bytes/vec", "d"),
                ("build", "build s", ".2f"),
                ("qps", "queries/s", ",.0f"),
                ("recall", "recall@10", ".3f"),
            ],
        )
    )
    bar.update(1)
    bar.close()
    result["meta"]["seconds"] = time.perf_counter() - started
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print(f"\n{result['meta']['seconds']:.0f} s in all. Full benchmarks: benchmarks/RESULTS.md")
