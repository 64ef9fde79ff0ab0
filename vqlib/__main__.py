"""Command line: `python -m vqlib demo` runs the main job on generated data (no download);
`python -m vqlib index build|search|info` builds and queries ANN indexes from .npy files."""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

import vqlib
from vqlib.retrieval import cli as retrieval_cli
from vqlib.testing import clustered, mse, timed


def _inertia(x, centroids) -> float:
    return float(np.asarray(vqlib.assign(x, np.asarray(centroids, np.float32))[1], np.float64).sum())


def demo(n: int, d: int, k: int, iters: int) -> list[dict]:
    """k-means on structured synthetic data: vqlib against faiss-cpu from the same initial centroids."""
    x = np.asarray(clustered(jax.random.key(0), n, d, num_clusters=4 * k, intrinsic_dim=min(d, 16)))
    init = np.asarray(vqlib.fit(x, "kmeans", k=k, max_iter=0).centroids)  # k-means++ seeds, shared by all
    rows = []
    for label in ("vqlib (first call, with compile)", "vqlib"):
        start = time.perf_counter()
        cb = vqlib.fit(x, "kmeans", k=k, init=init, max_iter=iters, tol=0.0)
        cb.centroids.block_until_ready()
        rows.append(dict(method=label, seconds=time.perf_counter() - start, inertia=_inertia(x, cb.centroids)))
    try:
        import faiss
    except ImportError:
        rows.append(
            dict(method="faiss-cpu (not installed: pip install faiss-cpu)", seconds=float("nan"), inertia=float("nan"))
        )
    else:
        km = faiss.Kmeans(d, k, niter=iters, max_points_per_centroid=10**9, seed=1)
        start = time.perf_counter()
        km.train(x, init_centroids=init)
        rows.append(
            dict(method="faiss-cpu Kmeans", seconds=time.perf_counter() - start, inertia=_inertia(x, km.centroids))
        )
    return rows


def demo_codebooks(x, m: int, beam: int) -> list[dict]:
    """PQ and RVQ at m bytes per vector (m codes of 256): vqlib against faiss-cpu on the same data."""
    d = x.shape[1]
    rows = []
    for label, method, options in [
        (f"vqlib PQ {m}x8", "pq", dict(m=m)),
        (f"vqlib RVQ {m}x8, beam {beam}", "rvq", dict(m=m, beam=beam)),
    ]:
        vqlib.encode(vqlib.fit(x, method, **options), x)  # compile first: the table shows steady-state times
        cb, fit_s = timed(vqlib.fit, x, method, **options)
        codes, enc_s = timed(vqlib.encode, cb, x)
        rows.append(dict(method=label, seconds=fit_s, encode=enc_s, mse=mse(x, vqlib.decode(cb, codes))))
    try:
        import faiss
    except ImportError:
        return rows
    rq = faiss.ResidualQuantizer(d, m, 8)
    rq.max_beam_size = beam
    for label, q in [
        (f"faiss-cpu ProductQuantizer {m}x8", faiss.ProductQuantizer(d, m, 8)),
        (f"faiss-cpu RQ, beam {beam}", rq),
    ]:
        _, fit_s = timed(q.train, x)
        codes, enc_s = timed(q.compute_codes, x)
        rows.append(dict(method=label, seconds=fit_s, encode=enc_s, mse=mse(x, q.decode(codes))))
    return rows


def demo_turboquant(x, bits: int) -> dict:
    """TurboQuant-mse at `bits` bits per coordinate plus a float16 norm: data-oblivious, nothing to train."""
    vqlib.encode(vqlib.fit(x, "turboquant", bits=bits), x)  # compile first
    cb, fit_s = timed(vqlib.fit, x, "turboquant", bits=bits)
    codes, enc_s = timed(vqlib.encode, cb, x)
    label = f"vqlib TurboQuant {bits}b/dim + f16 norm"
    return dict(method=label, seconds=fit_s, encode=enc_s, mse=mse(x, vqlib.decode(cb, codes)))


def demo_index(x, m: int, nprobe: int = 16) -> list[dict]:
    """IVF-PQ at m bytes per vector: build, then 1,000 queries; vqlib against faiss-cpu's IndexIVFPQ."""
    queries, base = x[:1000], x[1000:]
    nlist = int(4 * np.sqrt(len(base)))
    exact = vqlib.retrieval.search(vqlib.retrieval.build(base, "flat"), queries, k=10)[1]

    def recall(ids) -> float:
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=True)]))

    index, build_s = timed(vqlib.retrieval.build, base, "ivfpq", nlist=nlist, m=m)
    vqlib.retrieval.search(index, queries, k=10, nprobe=nprobe)  # compile first
    (_, ids), search_s = timed(vqlib.retrieval.search, index, queries, k=10, nprobe=nprobe)
    rows = [
        dict(method=f"vqlib IVF{nlist},PQ{m} nprobe {nprobe}", build=build_s, qps=1000 / search_s, recall=recall(ids))
    ]
    try:
        import faiss
    except ImportError:
        return rows
    start = time.perf_counter()
    peer = faiss.IndexIVFPQ(faiss.IndexFlatL2(x.shape[1]), x.shape[1], nlist, m, 8)
    peer.train(base)
    peer.add(base)
    build_s = time.perf_counter() - start
    peer.nprobe = nprobe
    start = time.perf_counter()
    ids = peer.search(queries, 10)[1]
    rows.append(
        dict(
            method=f"faiss-cpu IVF{nlist},PQ{m} nprobe {nprobe}",
            build=build_s,
            qps=1000 / (time.perf_counter() - start),
            recall=recall(ids),
        )
    )
    return rows


def _print_table(title: str, rows: list[dict]) -> None:
    print(title)
    print(f"{'method':<36} {'fit s':>8} {'inertia':>14}")
    for r in rows:
        print(f"{r['method']:<36} {r['seconds']:>8.2f} {r['inertia']:>14.6g}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="vqlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="k-means on generated data, vqlib vs faiss-cpu")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--iters", type=int, default=20)
    retrieval_cli.add_parser(sub)
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits 2
    try:
        _run(args)
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        # a user mistake (missing or bad file, missing option, bad value): one line, no traceback;
        # VQLIB_TRACEBACK=1 shows the traceback (to report a bug)
        if os.environ.get("VQLIB_TRACEBACK"):
            raise
        command = " ".join(["vqlib", args.command] + ([args.index_command] if args.command == "index" else []))
        print(f"{command}: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        message = f"{e.filename}: {e.strerror}"
    else:
        message = str(e) or type(e).__name__
    return " ".join(message.split())


def _run(args) -> None:
    if args.command == "index":
        retrieval_cli.run(args)
    elif args.command == "demo":
        print(
            f"vqlib {vqlib.__version__} on {jax.devices()[0].platform}; n={args.n} d={args.d} k={args.k}, "
            f"{args.iters} Lloyd iterations from the same k-means++ seeds"
        )
        _print_table("k-means", demo(args.n, args.d, args.k, args.iters))
        x = np.asarray(
            clustered(jax.random.key(0), args.n, args.d, num_clusters=4 * args.k, intrinsic_dim=min(args.d, 16))
        )
        m = max(1, args.d // 8)
        print(f"\ncodebooks: {m} bytes per vector ({m} codes of 8 bits), same data, compiled")
        print(f"{'method':<36} {'fit s':>8} {'encode s':>9} {'MSE':>12}")
        for r in [*demo_codebooks(x, m, beam=4), demo_turboquant(x, bits=max(1, round(8 * m / args.d)))]:
            print(f"{r['method']:<36} {r['seconds']:>8.2f} {r['encode']:>9.2f} {r['mse']:>12.6g}")
        print(f"\nANN index: {m} bytes per vector, 1,000 held-out queries, recall@10 against exact search")
        print(f"{'method':<36} {'build s':>8} {'queries/s':>10} {'recall@10':>10}")
        for r in demo_index(x, m):
            print(f"{r['method']:<36} {r['build']:>8.2f} {r['qps']:>10.0f} {r['recall']:>10.3f}")


if __name__ == "__main__":
    main()
