"""k-means per-iteration cost: vqlib vs faiss-cpu Kmeans vs scikit-learn KMeans(lloyd), one process.

Same data, same initial centroids, exact Lloyd everywhere (faiss subsampling off). Seconds
per iteration are (T(iters) - T(iters_short)) / (iters - iters_short), which cancels set-up and
the final assignment, each T the median of `--repeats` runs; vqlib is compiled before timing.
Memory: for each library a fresh process loads the data, then runs one 5-iteration fit; we report
its RSS with the data loaded and its peak RSS during the fit (sampled every 5 ms; includes JAX's
compilation for vqlib). The machine's float32
matmul rate is measured in the same run, and the assignment's share of it (2 n k d flops per
iteration) is the honest measure of how close to the limit each library runs.

    python benchmarks/kmeans_cpu.py            # all shapes, writes benchmarks/results/kmeans_cpu.json
    python benchmarks/kmeans_cpu.py --quick    # small shapes, a smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import psutil
from machine import describe

import vqlib

SHAPES = [(50_000, 64, 256), (200_000, 128, 1024), (1_000_000, 128, 1024)]
QUICK_SHAPES = [(20_000, 32, 64), (50_000, 64, 256)]


class PeakRSS:
    """Context manager: the process's RSS at entry (`before`) and its largest RSS inside (`peak`), bytes."""

    def __enter__(self):
        self._proc = psutil.Process()
        self.before = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def matmul_rate() -> dict:
    """float32 GFLOP/s of a 4096^3 matmul, through JAX (XLA) and through numpy (BLAS)."""
    n = 4096
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, a).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        f(a, a).block_until_ready()
    jax_rate = 5 * 2 * n**3 / (time.perf_counter() - start) / 1e9
    b = np.ones((n, n), np.float32)
    b @ b
    start = time.perf_counter()
    for _ in range(5):
        b @ b
    np_rate = 5 * 2 * n**3 / (time.perf_counter() - start) / 1e9
    return {"jax_gflops": jax_rate, "numpy_gflops": np_rate, "best_gflops": max(jax_rate, np_rate)}


def inertia(x, centroids) -> float:
    return float(np.asarray(vqlib.assign(x, np.asarray(centroids, np.float32))[1], np.float64).sum())


def run_vqlib(x, init, iters):
    cb = vqlib.fit(x, "kmeans", k=len(init), init=init, max_iter=iters, tol=0.0)
    cb.centroids.block_until_ready()
    return np.asarray(cb.centroids)


def run_faiss(x, init, iters):
    import faiss

    km = faiss.Kmeans(
        x.shape[1], len(init), niter=iters, max_points_per_centroid=10**9, min_points_per_centroid=1, seed=1
    )
    km.train(x, init_centroids=init)
    return km.centroids


def run_sklearn(x, init, iters):
    from sklearn.cluster import KMeans

    km = KMeans(len(init), init=init, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd").fit(x)
    assert km.n_iter_ == iters, f"sklearn stopped after {km.n_iter_} iterations"
    return km.cluster_centers_


PEERS = {"vqlib": run_vqlib, "faiss-cpu": run_faiss, "scikit-learn": run_sklearn}


def median_seconds(run, repeats):
    """Median wall time of `repeats` calls of run(), and run()'s last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        centroids = run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), centroids


def make_problem(n, d, k):
    """Structured data and k initial centroids drawn from it, the same for every library."""
    x = np.asarray(vqlib.testing.clustered(jax.random.key(0), n, d, num_clusters=4 * k, intrinsic_dim=min(d, 32)))
    return x, x[np.random.default_rng(0).choice(n, k, replace=False)]


def run_vqlib_default_init(x, init, iters):
    cb = vqlib.fit(x, "kmeans", k=len(init), max_iter=iters, tol=0.0)  # k-means++ on a subsample
    return np.asarray(cb.centroids)


def memory_probe(library, n, d, k, iters):
    """In this (fresh) process: RSS with the data loaded, and peak RSS while one fit runs
    (compilation included for vqlib). Prints JSON for `fresh_process_memory`."""
    x, init = make_problem(n, d, k)
    run = {**PEERS, "vqlib-default-init": run_vqlib_default_init}[library]
    with PeakRSS() as mem:
        start = time.perf_counter()
        run(x, init, iters)
        seconds = time.perf_counter() - start
    print(json.dumps({"before_gb": mem.before / 2**30, "peak_gb": mem.peak / 2**30, "seconds": seconds}))


def fresh_process_memory(library, n, d, k, iters=5):
    command = [sys.executable, __file__, "--memory-probe", library, str(n), str(d), str(k), str(iters)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_shape(n, d, k, iters, short, rate, repeats):
    x, init = make_problem(n, d, k)
    run_vqlib(x, init, iters)  # compile both iteration counts before timing
    run_vqlib(x, init, short)
    rows = []
    for name, run in PEERS.items():
        t_short, _ = median_seconds(functools.partial(run, x, init, short), repeats)
        t_long, centroids = median_seconds(functools.partial(run, x, init, iters), repeats)
        mem = fresh_process_memory(name, n, d, k)
        per_iter = (t_long - t_short) / (iters - short)
        rows.append(
            {
                "library": name,
                "n": n,
                "d": d,
                "k": k,
                "iters": iters,
                "seconds_per_iter": per_iter,
                "whole_fit_s": t_long,  # the iters-iteration fit as a user times it (compiled; set-up included)
                "assign_gflops": 2 * n * k * d / per_iter / 1e9,
                "fraction_of_matmul": 2 * n * k * d / per_iter / 1e9 / rate["best_gflops"],
                "inertia": inertia(x, centroids),
                "rss_with_data_gb": mem["before_gb"],
                "peak_rss_gb": mem["peak_gb"],
            }
        )
    base = {r["library"]: r for r in rows}["vqlib"]
    for r in rows:
        r["time_ratio_vs_vqlib"] = r["seconds_per_iter"] / base["seconds_per_iter"]
        r["whole_fit_ratio_vs_vqlib"] = r["whole_fit_s"] / base["whole_fit_s"]
        r["inertia_ratio_vs_vqlib"] = r["inertia"] / base["inertia"]
    return rows


def bench_batched(b=1024, n=512, d=64, k=16, iters=20, short=5, repeats=3):
    """Many small problems (per-head / per-group codebooks): one vmapped vqlib call vs a loop of
    faiss / scikit-learn fits, from the same initial centroids."""
    from sklearn.cluster import KMeans

    xs = np.asarray(
        jax.vmap(lambda key: vqlib.testing.clustered(key, n, d, num_clusters=8))(jax.random.split(jax.random.key(1), b))
    )
    inits = xs[:, :k].copy()

    def run_vqlib(iters):
        cb = vqlib.codebooks.fit_kmeans_batched(jax.random.key(0), xs, k=k, init=inits, max_iter=iters, tol=0.0)
        return np.asarray(cb.centroids)

    def run_faiss(iters):
        import faiss

        out = []
        for x, init in zip(xs, inits, strict=True):
            km = faiss.Kmeans(d, k, niter=iters, max_points_per_centroid=10**9, min_points_per_centroid=1, seed=1)
            km.train(x, init_centroids=init)
            out.append(km.centroids)
        return np.stack(out)

    def run_sklearn(iters):
        fit = lambda x, init: KMeans(k, init=init, n_init=1, max_iter=iters, tol=0.0).fit(x).cluster_centers_  # noqa: E731
        return np.stack([fit(x, init) for x, init in zip(xs, inits, strict=True)])

    rows = []
    for name, run in {"vqlib": run_vqlib, "faiss-cpu": run_faiss, "scikit-learn": run_sklearn}.items():
        run(short), run(iters)  # compile / warm up
        t_short, _ = median_seconds(functools.partial(run, short), repeats)
        t_long, centroids = median_seconds(functools.partial(run, iters), repeats)
        total = sum(inertia(x, c) for x, c in zip(xs, centroids, strict=True))
        rows.append(
            {
                "library": name,
                "problems": b,
                "n": n,
                "d": d,
                "k": k,
                "seconds_per_iter": (t_long - t_short) / (iters - short),
                "inertia": total,
            }
        )
    for r in rows:
        r["time_ratio_vs_vqlib"] = r["seconds_per_iter"] / rows[0]["seconds_per_iter"]
        r["inertia_ratio_vs_vqlib"] = r["inertia"] / rows[0]["inertia"]
    return rows


def bench_memory(n=2_000_000, d=32, k=4096, iters=3):
    """vqlib alone, default k-means++ init, at a size where the naive (n, k) float32 distance
    matrix would need n*k*4 bytes; measured in a fresh process."""
    mem = fresh_process_memory("vqlib-default-init", n, d, k, iters)
    return {
        "n": n,
        "d": d,
        "k": k,
        "iters": iters,
        "seconds_with_init_and_compile": mem["seconds"],
        "naive_distance_matrix_gb": n * k * 4 / 2**30,
        "rss_with_data_gb": mem["before_gb"],
        "peak_rss_gb": mem["peak_gb"],
        "data_gb": n * d * 4 / 2**30,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes only (smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing; the median is kept")
    parser.add_argument("--memory-probe", nargs=5, metavar=("LIBRARY", "N", "D", "K", "ITERS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "kmeans_cpu.json"))
    args = parser.parse_args()
    if args.memory_probe:
        library, *sizes = args.memory_probe
        return memory_probe(library, *map(int, sizes))
    rate = matmul_rate()
    print(f"float32 matmul 4096^3: jax {rate['jax_gflops']:.0f} GFLOP/s, numpy {rate['numpy_gflops']:.0f} GFLOP/s")
    rows = []
    for n, d, k in QUICK_SHAPES if args.quick else SHAPES:
        iters, short = (10, 2) if args.quick else (20, 5)
        rows += bench_shape(n, d, k, iters=iters, short=short, rate=rate, repeats=args.repeats)
    print(
        f"\n{'n':>9} {'d':>4} {'k':>5} {'library':<13} {'s/iter':>8} {'x vqlib':>8} {'GFLOP/s':>8} "
        f"{'of matmul':>9} {'inertia/vqlib':>13} {'RSS GB':>7} {'peak GB':>8} {'fit s':>7} {'x vqlib':>8}"
    )
    for r in rows:
        print(
            f"{r['n']:>9} {r['d']:>4} {r['k']:>5} {r['library']:<13} {r['seconds_per_iter']:>8.4f} "
            f"{r['time_ratio_vs_vqlib']:>8.2f} {r['assign_gflops']:>8.0f} {r['fraction_of_matmul']:>9.0%} "
            f"{r['inertia_ratio_vs_vqlib']:>13.6f} {r['rss_with_data_gb']:>7.2f} {r['peak_rss_gb']:>8.2f} "
            f"{r['whole_fit_s']:>7.3f} {r['whole_fit_ratio_vs_vqlib']:>8.2f}"
        )
    batched = bench_batched(b=64 if args.quick else 1024)
    head = batched[0]
    print(f"\n{head['problems']} problems of {head['n']} x {head['d']}, k={head['k']}:")
    print(f"{'library':<13} {'s/iter (all problems)':>22} {'x vqlib':>8} {'inertia/vqlib':>13}")
    for r in batched:
        print(
            f"{r['library']:<13} {r['seconds_per_iter']:>22.4f} {r['time_ratio_vs_vqlib']:>8.2f} "
            f"{r['inertia_ratio_vs_vqlib']:>13.6f}"
        )
    memory = None if args.quick else bench_memory()
    if memory:
        print(
            f"\nvqlib n={memory['n']:,} d={memory['d']} k={memory['k']}, fresh process: peak RSS "
            f"{memory['peak_rss_gb']:.2f} GB ({memory['rss_with_data_gb']:.2f} GB with the data loaded; data "
            f"{memory['data_gb']:.2f} GB; a naive distance matrix would be "
            f"{memory['naive_distance_matrix_gb']:.0f} GB), {memory['seconds_with_init_and_compile']:.1f} s"
        )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "cpu": describe(),
        "jax": jax.__version__,
        "matmul": rate,
        "rows": rows,
        "batched": batched,
        "memory": memory,
    }
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
