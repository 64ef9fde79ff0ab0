"""Rate-distortion: MSE and inner-product error against bits per dimension, for TurboQuant (mse,
prod), E8 / E8P, PQ, RVQ, AQ and faiss's ScalarQuantizer, on the same unit vectors.

Data: i.i.d. Gaussian vectors in d = 128, and GloVe-6B-50d from ../shared/data when present
(rows of base.npy; queries from query.npy), every vector normalized to unit length as in the
TurboQuant paper, so D_mse = E||x - x~||^2 compares directly with its figures and with the
bounds 4^-b <= D_mse <= (sqrt(3) pi / 2) 4^-b. Data-dependent methods (PQ, RVQ, AQ, faiss SQ,
the E8 step) are fitted on `--train` rows and measured on `--test` other rows; queries are
separate unit vectors.

Columns: bits/dim = stored bits per vector / d, side data (norms) included, codebooks excluded;
E8 / E8P on d = 50 pad to 56 columns, counted over 50; E8P at 3 bits counts 16 + 8 bits per
block (a ResidualChain's codes are packed at the widest stage's width, 16). MSE = mean
||x - x~||^2. IP error = d * mean (<q, x> - est)^2 over (query, vector) pairs, the paper's
D_prod * d / ||q||^2, with est from `vqlib.inner_product` (decoded for the non-TurboQuant codes).
IP slope = least-squares slope of est on <q, x>: 1 for an unbiased estimator, 1 - D_mse for
TurboQuant-mse. Seconds are fit and encode wall times on this machine, after a compile.

    python benchmarks/rate_distortion.py            # writes benchmarks/results/rate_distortion.{json,png}
    python benchmarks/rate_distortion.py --quick    # small sizes, a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import numpy as np

import vqlib
from vqlib.codebooks import AdditiveCodebook

RESULTS = pathlib.Path(__file__).parent / "results"
GLOVE = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glove-6b-50d"
PAPER_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}  # TurboQuant, arXiv 2504.19874 (ALGORITHMS.md)
PAPER_PROD = {1: 1.57, 2: 0.56, 3: 0.18, 4: 0.047}  # D_prod * d / ||y||^2
PQ_SHAPES = {1: [(8, 256), (10, 1024)], 2: [(4, 256), (5, 1024)], 3: [(2, 64)], 4: [(2, 256)]}  # (dsub, k)


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def datasets(key, n_train: int, n_test: int, n_queries: int) -> dict:
    keys = jax.random.split(key, 3)
    out = {
        "gaussian-128": tuple(
            unit(jax.random.normal(k, (n, 128))) for k, n in zip(keys, (n_train, n_test, n_queries), strict=True)
        )
    }
    if GLOVE.is_dir():
        base = np.load(GLOVE / "base.npy", mmap_mode="r")
        queries = np.load(GLOVE / "query.npy", mmap_mode="r")
        out["glove-50d"] = (unit(base[:n_train]), unit(base[n_train : n_train + n_test]), unit(queries[:n_queries]))
    return out


def pad8(x):
    return np.pad(x, ((0, 0), (0, -x.shape[1] % 8)))


def stored_bits(cb) -> int:
    """Bits per vector as stored, each stage of a residual chain at its own code width."""
    if isinstance(cb, vqlib.ResidualChain):
        return sum(stored_bits(stage) for stage in cb.stages)
    return vqlib.code_layout(cb).bits_per_vector


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def vqlib_configs(d: int) -> list[tuple[str, int, str, dict]]:
    """(family, nominal bits, method, options) of every vqlib codebook measured at dimension d."""
    out = [("TurboQuant-mse", b, "turboquant", dict(bits=b)) for b in (1, 2, 3, 4)]
    out += [("TurboQuant-prod", b, "turboquant_prod", dict(bits=b)) for b in (1, 2, 3, 4)]
    out += [("E8", b, "e8", dict(bits=b, rotation="hadamard")) for b in (1, 2)]
    out += [("E8P", b, "e8p", dict(bits=b)) for b in (2, 3, 4)]
    for b, shapes in PQ_SHAPES.items():
        dsub, k = next((s for s in shapes if d % s[0] == 0), shapes[-1])
        if d % dsub == 0:
            out.append(("PQ", b, "pq", dict(m=d // dsub, k=k)))
    return out


def measure(label, bits, d, functions, seconds, x, q):
    """One table row: `functions` = (decode the test rows, estimate <queries, test rows>)."""
    decode, inner = functions
    x_hat = np.asarray(decode(), np.float64)[:, : x.shape[1]]
    est = np.asarray(inner(), np.float64)
    true = np.asarray(q, np.float64) @ np.asarray(x, np.float64).T
    return {
        "method": label,
        "bits_per_dim": bits / d,
        "mse": float(np.mean(np.sum((np.asarray(x, np.float64) - x_hat) ** 2, axis=1))),
        "ip_error": float(d * np.mean((est - true) ** 2)),
        "ip_slope": float(np.sum(est * true) / np.sum(true * true)),
        "fit_s": seconds[0],
        "encode_s": seconds[1],
    }


def run_vqlib(family, method, options, train, test, queries, key):
    d = train.shape[1]
    padded = method in ("e8", "e8p") and d % 8
    tr, te, qu = (pad8(a) for a in (train, test, queries)) if padded else (train, test, queries)
    vqlib.encode(vqlib.fit(tr, method, key=key, **options), te)  # compile first
    cb, fit_s = timed(vqlib.fit, tr, method, key=key, **options)
    codes, enc_s = timed(vqlib.encode, cb, te)
    label = f"{family} {options.get('bits', '')}".strip() if family != "PQ" else f"PQ {options['m']}x{options['k']}"
    return measure(
        label,
        stored_bits(cb),
        d,
        (lambda: vqlib.decode(cb, codes), lambda: vqlib.inner_product(cb, codes, qu)),
        (fit_s, enc_s),
        test,
        queries,
    )


def run_additive(method, max_bits, train, test, queries, key, **options):
    """RVQ / AQ with k = 256 at m = round(d b / 8) stages; RVQ's shorter chains are prefixes of one fit.
    Their fit and encode times include compilation (a warm-up fit would double the benchmark's time)."""
    d = train.shape[1]
    stages = [max(1, round(d * b / 8)) for b in range(1, max_bits + 1)]
    rows = []
    for m in stages if method == "aq" else stages[-1:]:
        cb, fit_s = timed(vqlib.fit, train, method, key=key, m=m, **options)
        for prefix in stages if method == "rvq" else [m]:
            sub = AdditiveCodebook(cb.codebooks[:prefix], beam=cb.beam, icm_iter=cb.icm_iter)
            codes, enc_s = timed(vqlib.encode, sub, test)
            rows.append(
                measure(
                    f"{method.upper()} {prefix}x256",
                    vqlib.code_layout(sub).bits_per_vector,
                    d,
                    (
                        lambda sub=sub, codes=codes: vqlib.decode(sub, codes),
                        lambda sub=sub, codes=codes: vqlib.inner_product(sub, codes, queries),
                    ),
                    (fit_s, enc_s),
                    test,
                    queries,
                )
            )
    return rows


def run_faiss_sq(train, test, queries) -> list[dict]:
    import faiss

    rows = []
    for name in ("QT_4bit", "QT_6bit", "QT_8bit"):
        sq = faiss.ScalarQuantizer(train.shape[1], getattr(faiss.ScalarQuantizer, name))
        _, fit_s = timed(sq.train, train)
        codes, enc_s = timed(sq.compute_codes, test)
        x_hat = sq.decode(codes)
        rows.append(
            measure(
                f"faiss SQ {name}",
                8 * sq.code_size,
                train.shape[1],
                (lambda x_hat=x_hat: x_hat, lambda x_hat=x_hat: np.asarray(queries) @ x_hat.T),
                (fit_s, enc_s),
                test,
                queries,
            )
        )
    return rows


def run_dataset(name, train, test, queries, *, aq_bits: int, key) -> list[dict]:
    d = train.shape[1]
    rows = []
    for family, _, method, options in vqlib_configs(d):
        rows.append(run_vqlib(family, method, options, train, test, queries, key))
        print(
            f"  {name} {rows[-1]['method']}: {rows[-1]['bits_per_dim']:.2f} bits/dim, MSE {rows[-1]['mse']:.4f}",
            flush=True,
        )
    rows += run_additive("rvq", 4, train, test, queries, key)
    rows += run_additive("aq", aq_bits, train, test, queries, key, beam=8, icm_iter=2, max_iter=3)
    rows += run_faiss_sq(train, test, queries)
    for r in rows:
        r["dataset"] = name
    return sorted(rows, key=lambda r: (r["method"].split()[0], r["bits_per_dim"]))


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'dataset':<13} {'method':<22} {'bits/dim':>8} {'MSE':>9} {'IP error':>9} {'IP slope':>8} "
        f"{'fit s':>7} {'enc s':>7}"
    )
    for r in rows:
        print(
            f"{r['dataset']:<13} {r['method']:<22} {r['bits_per_dim']:>8.2f} {r['mse']:>9.4f} {r['ip_error']:>9.4f} "
            f"{r['ip_slope']:>8.3f} {r['fit_s']:>7.2f} {r['encode_s']:>7.2f}"
        )
    print("\nTurboQuant paper (unit vectors): D_mse", PAPER_MSE, "; D_prod * d", PAPER_PROD, "; lower bound 4^-b")


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 4.5 * len(names)), squeeze=False)
    b = np.linspace(0.8, 8.5, 100)
    for axes_row, name in zip(axes, names, strict=True):
        mine = [r for r in rows if r["dataset"] == name]
        for ax, metric, title in [
            (axes_row[0], "mse", "MSE  E||x - x~||^2"),
            (axes_row[1], "ip_error", "IP error  d E(<q,x> - est)^2"),
        ]:
            for family in sorted({r["method"].rsplit(" ", 1)[0] if r["method"][:2] != "PQ" else "PQ" for r in mine}):
                pts = sorted((r["bits_per_dim"], r[metric]) for r in mine if r["method"].startswith(family))
                ax.plot(*zip(*pts, strict=True), "o-", label=family, ms=4)
            if metric == "mse":
                ax.plot(b, 4.0**-b, "k--", lw=1, label="lower bound 4^-b")
                ax.plot(b, np.sqrt(3) * np.pi / 2 * 4.0**-b, "k:", lw=1, label="TurboQuant upper bound")
                ax.plot(list(PAPER_MSE), list(PAPER_MSE.values()), "k*", ms=9, label="TurboQuant paper")
            else:
                ax.plot(list(PAPER_PROD), list(PAPER_PROD.values()), "k*", ms=9, label="TurboQuant-prod paper")
            ax.set(yscale="log", xlabel="bits per dimension (side data included)", title=f"{name}: {title}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--train", type=int, default=20_000)
    parser.add_argument("--test", type=int, default=5_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--aq-bits", type=int, default=2, help="AQ up to this many bits per dimension (slow)")
    parser.add_argument("--out", default=str(RESULTS / "rate_distortion.json"))
    args = parser.parse_args()
    sizes = (2_000, 500, 50) if args.quick else (args.train, args.test, args.queries)
    key = jax.random.key(0)
    start = time.perf_counter()
    rows = []
    for name, (train, test, queries) in datasets(key, *sizes).items():
        print(f"{name}: train {train.shape}, test {test.shape}, queries {queries.shape}", flush=True)
        rows += run_dataset(name, train, test, queries, aq_bits=1 if args.quick else args.aq_bits, key=key)
    print_table(rows)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "jax": jax.__version__,
        "sizes": dict(zip(("train", "test", "queries"), sizes, strict=True)),
        "seconds": time.perf_counter() - start,
        "paper": {"mse": PAPER_MSE, "prod_times_d": PAPER_PROD},
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
