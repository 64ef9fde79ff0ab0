"""TurboQuant fit + encode against faiss-cpu's 4-bit ScalarQuantizer, and the rotation's cost, one process.

The TurboQuant paper's indexing set is 100,000 unit vectors of d = 1,536 (OpenAI embeddings);
this runs on Gaussian vectors normalised to the sphere, the same shape and bytes. Timed as a user
sees them (block_until_ready before every clock stops):

- faiss: `IndexScalarQuantizer(d, QT_4bit)` train + `sa_encode` (4-bit codes, per-dimension ranges);
- vqlib: `vqlib.fit(x, "turboquant", bits=4, rotation=...)` + `vqlib.encode`, the first call
  (compilation included) and a second one (compiled), for the randomized Hadamard rotation
  (1,536 = 3 x 512: a 3 x 3 Haar factor kron H_512, H_512 as H_32 kron H_16) and the dense one;
- the rotation alone (`vqlib.codebooks.rotate`) against one dense d x d float32 product;
- the relative error of each code, E||x - x~||^2 / ||x||^2 (the paper: 0.009 at 4 bits).

    python benchmarks/turboquant_cpu.py                 # n = 100,000, writes results/turboquant_cpu.json
    python benchmarks/turboquant_cpu.py --n 20000       # smaller
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import time

import faiss
import jax
import jax.numpy as jnp
import numpy as np
from machine import describe

import vqlib
from vqlib.codebooks import rotate

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def clock(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - start, out


def relative_error(x: np.ndarray, x_hat: np.ndarray) -> float:
    x64 = x.astype(np.float64)
    return float(np.mean(np.sum((x64 - x_hat) ** 2, axis=1) / np.sum(x64**2, axis=1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=1536)
    args = parser.parse_args()
    n, d = args.n, args.d
    row = dict(cpu=describe(), date=datetime.date.today().isoformat(), jax=jax.__version__, n=n, d=d)
    row["faiss_threads"] = faiss.omp_get_max_threads()
    row["load_average_before"] = round(os.getloadavg()[0], 2)
    print(f"CPU: {row['cpu']}; jax {jax.__version__} on {jax.default_backend()}; n={n}, d={d}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_4bit)
    row["faiss_sq4_s"], codes = clock(lambda: (sq.train(x), sq.sa_encode(x))[1])
    row["faiss_sq4_error"] = relative_error(x, sq.sa_decode(codes))

    xj = jnp.asarray(x)
    for kind in ("hadamard", "dense"):
        first_fit, cb = clock(lambda kind=kind: vqlib.fit(xj, "turboquant", bits=4, rotation=kind))
        first_encode, _ = clock(lambda cb=cb: vqlib.encode(cb, xj))
        fit_s, cb = clock(lambda kind=kind: vqlib.fit(xj, "turboquant", bits=4, rotation=kind))
        encode_s, codes = clock(lambda cb=cb: vqlib.encode(cb, xj))
        clock(lambda cb=cb: rotate(cb.rotation, xj))
        rotate_s, _ = clock(lambda cb=cb: rotate(cb.rotation, xj))
        row[kind] = dict(
            first_fit_plus_encode_s=round(first_fit + first_encode, 3),
            fit_s=round(fit_s, 3),
            encode_s=round(encode_s, 3),
            rotate_s=round(rotate_s, 3),
            error=relative_error(x, np.asarray(vqlib.decode(cb, codes), np.float64)),
            vs_faiss_sq4=round((fit_s + encode_s) / row["faiss_sq4_s"], 2),
        )
    dense = jnp.asarray(rng.standard_normal((d, d), dtype=np.float32))
    product = jax.jit(lambda a, b: a @ b)
    clock(lambda: product(xj, dense))
    row["dense_product_s"] = round(clock(lambda: product(xj, dense))[0], 3)
    row["hadamard_rotation_speedup_vs_dense_product"] = round(row["dense_product_s"] / row["hadamard"]["rotate_s"], 2)
    row["load_average_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(row, indent=1))
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / "turboquant_cpu.json.tmp"
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    tmp.replace(RESULTS / "turboquant_cpu.json")


if __name__ == "__main__":
    main()
