"""PQ, OPQ, RVQ and AQ: vqlib vs the matching faiss-cpu quantizer, one process, the same data.

For each quantizer: training time (vqlib compiled first by an identical call, so the figure is
steady state; the first call's time, with compilation, is in the JSON; fits whose first call
takes over 30 s are timed once, compilation included), encoding throughput over
all n vectors, and the MSE of decode(encode(x)) at the same bits per vector. Data: structured
synthetic vectors (clustered, intrinsic dimension 32 of 128) and, when ../shared/data is present,
GloVe-6B-50d padded to 64 dimensions (real embeddings).

    python benchmarks/codebooks_cpu.py             # 100,000 x 128, writes benchmarks/results/codebooks_cpu.json
    python benchmarks/codebooks_cpu.py --quick     # 20,000 x 64, small codebooks: a smoke test
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import faiss
import jax
import numpy as np
from machine import describe

import vqlib
from vqlib.testing import clustered, mse, timed

GLOVE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "glove-6b-50d" / "base.npy"


def configs(d: int, quick: bool) -> list[dict]:
    """(name, vqlib method and options, faiss constructor): the issue's four settings."""
    m_pq, m_add, nbits = (8, 4, 6) if quick else (16, 8, 8)
    k = 2**nbits

    def rq(beam):
        q = faiss.ResidualQuantizer(d, m_add, nbits)
        q.max_beam_size = beam
        return q

    return [
        dict(
            name=f"PQ {m_pq}x{nbits}",
            method="pq",
            options=dict(m=m_pq, k=k),
            faiss=lambda: faiss.ProductQuantizer(d, m_pq, nbits),
        ),
        dict(name=f"OPQ {m_pq}x{nbits}", method="opq", options=dict(m=m_pq, k=k), faiss=lambda: ("opq", m_pq, nbits)),
        dict(name=f"RVQ {m_add}x{nbits} beam 4", method="rvq", options=dict(m=m_add, k=k, beam=4), faiss=lambda: rq(4)),
        dict(
            name=f"AQ {m_add}x{nbits} beam 8",
            method="aq",
            options=dict(m=m_add, k=k, beam=8),
            faiss=lambda: faiss.LocalSearchQuantizer(d, m_add, nbits),
        ),
    ]


def _run_faiss(make, x):
    q = make()
    if isinstance(q, tuple):  # OPQ: faiss's OPQMatrix, then a ProductQuantizer on the rotated data
        _, m, nbits = q
        opq, pq = faiss.OPQMatrix(x.shape[1], m), faiss.ProductQuantizer(x.shape[1], m, nbits)
        start = time.perf_counter()
        opq.train(x)
        pq.train(opq.apply(x))
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        codes = pq.compute_codes(opq.apply(x))
        encode_s = time.perf_counter() - start
        return train_s, encode_s, mse(x, opq.reverse_transform(pq.decode(codes)))
    _, train_s = timed(q.train, x)
    codes, encode_s = _median_timed(q.compute_codes, x)
    return train_s, encode_s, mse(x, q.decode(codes))


def _median_timed(fn, *args):
    """(the last result, the median of 3 timed calls): single encodes spread, e.g. vqlib's PQ 16x8
    of 100k vectors 0.12-0.23 s on an AMD EPYC."""
    times = []
    for _ in range(3):
        out, seconds = timed(fn, *args)
        times.append(seconds)
    return out, float(np.median(times))


def _run_vqlib(method, options, x):
    cb, first_s = timed(vqlib.fit, x, method, **options)
    train_s = first_s
    if first_s < 30:  # a second, compiled call; past 30 s compilation is a few percent of the first
        cb, train_s = timed(vqlib.fit, x, method, **options)
    vqlib.encode(cb, x[:1000])  # compiles for this codebook's static options (n differs: compiles again below)
    vqlib.encode(cb, x)
    codes, encode_s = _median_timed(vqlib.encode, cb, x)
    return first_s, train_s, encode_s, mse(x, vqlib.decode(cb, codes)), vqlib.code_layout(cb).bits_per_vector


def run(name: str, x: np.ndarray, quick: bool, only: str | None = None) -> list[dict]:
    rows = []
    for c in configs(x.shape[1], quick):
        if only is not None and c["method"] != only:
            continue
        first_s, train_s, encode_s, mse, bits = _run_vqlib(c["method"], c["options"], x)
        f_train, f_encode, f_mse = _run_faiss(c["faiss"], x)
        row = dict(
            data=name,
            quantizer=c["name"],
            bits_per_vector=bits,
            vqlib_train_s=train_s,
            vqlib_first_call_s=first_s,
            vqlib_encode_per_s=len(x) / encode_s,
            vqlib_mse=mse,
            faiss_train_s=f_train,
            faiss_encode_per_s=len(x) / f_encode,
            faiss_mse=f_mse,
        )
        rows.append(row)
        print(
            f"{name:<10} {c['name']:<18} {bits:>5} {train_s:>8.2f} {f_train:>8.2f} {f_train / train_s:>6.2f} "
            f"{len(x) / encode_s:>10.0f} {len(x) / f_encode:>10.0f} {f_encode / encode_s:>6.2f} "
            f"{mse:>9.4g} {f_mse:>9.4g} {mse / f_mse:>6.3f}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--only", choices=("pq", "opq", "rvq", "aq"), help="run one quantizer's rows")
    parser.add_argument("--out", help="results JSON (default results/codebooks_cpu.json; with --only X, _X.json)")
    args = parser.parse_args()
    n = args.n or (20_000 if args.quick else 100_000)
    d = 64 if args.quick else 128
    print(f"vqlib {vqlib.__version__}, faiss {faiss.__version__}, CPU: {describe()}; n={n}")
    print(
        f"{'data':<10} {'quantizer':<18} {'bits':>5} {'train s':>8} {'faiss s':>8} {'ratio':>6} "
        f"{'enc/s':>10} {'faiss/s':>10} {'ratio':>6} {'MSE':>9} {'faiss':>9} {'ratio':>6}"
    )
    print("(train ratio = faiss / vqlib, > 1: vqlib faster; encode ratio = vqlib / faiss; MSE ratio = vqlib / faiss)")
    x = np.asarray(clustered(jax.random.key(0), n, d, num_clusters=1024, intrinsic_dim=d // 4))
    rows = run("clustered", x, args.quick, args.only)
    if GLOVE.exists():
        glove = np.asarray(np.load(GLOVE, mmap_mode="r")[:n], np.float32)
        rows += run(
            "glove-64", np.ascontiguousarray(np.pad(glove, ((0, 0), (0, 64 - glove.shape[1])))), True, args.only
        )
    else:
        print(f"(GloVe skipped: {GLOVE} not found)")
    name = "codebooks_cpu" if args.only is None else f"codebooks_cpu_{args.only}"  # a partial run keeps the full one
    out = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results" / f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), machine=platform.platform(), cpu=describe(), n=n, d=d)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
