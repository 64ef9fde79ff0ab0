"""Every kernel op and backend timed in one run, with the device's own ceilings; one JSON summary.

    python benchmarks/gpu_kernels.py --json out.json          # the lent GPU: full sizes
    python benchmarks/gpu_kernels.py --quick --interpret      # CPU smoke run of the script itself

Sections (issue 18): ceilings (device-to-device copy, bf16 matmul), assign (n = 1M, d = 128,
k = 1,024 / 8,192, fp16 / bf16 / fp32, XLA against the Pallas kernel and a few tile shapes),
k-means per Lloyd iteration (`vqlib.fit(x, "kmeans", tol=0)`, the difference of two iteration
counts, so initialisation and compilation drop out), lut_matmul (batch 1 / 4 / 16, 4096 x 4096 and
4096 x 14336 weights, scalar / VQ / AQ / E8P layouts at 2-4 bits, against the dense bf16 matmul)
and adc_topk (1M codes x 16 bytes, 1,000 queries, k = 10 / 100, both table lookups).

Timing: 3 warm-up calls, then the median of --repeats calls, each on the next of 3 input copies
(rotating, so no call reads what the one before left in cache), host clock around
`jax.block_until_ready` (dispatch overhead, ~10-20 us, included). Every case runs in try/except:
a kernel that fails to compile is recorded with its error and the run goes on. Each Pallas result
is compared with the XLA one on the same inputs (agreement recorded next to the time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import vqlib
from vqlib.kernels import adc_topk, assign, backend, lut_matmul, lut_weight

ROWS: list[dict] = []
DEADLINE = [float("inf")]  # time.perf_counter() after which the remaining cases are recorded as skipped


def _time(fn, inputs, repeats: int) -> float:
    for i in range(3):
        jax.block_until_ready(fn(*inputs[i % len(inputs)]))
    times = []
    for i in range(repeats):
        args = inputs[i % len(inputs)]
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _stack(inputs):
    """A list of argument tuples -> one tuple of pytrees stacked along a new leading axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *inputs)


def _time_loop(fn, inputs, repeats: int) -> float:
    """Seconds per call of fn, from one jitted `lax.scan` over the stacked inputs (each call on
    another copy, the outputs summed so none is dropped): no host dispatch per call, which at
    decode-time sizes (10-40 us of work) would otherwise be most of what a host clock reads."""

    def body(acc, args):
        y = fn(*args)
        return acc + y.astype(jnp.float32), None

    def loop(stacked):
        shape = jax.eval_shape(fn, *jax.tree.map(lambda a: a[0], stacked))
        return jax.lax.scan(body, jnp.zeros(shape.shape, jnp.float32), stacked)[0]

    stacked = _stack(inputs)
    return _time(jax.jit(loop), [(stacked,)], repeats) / len(inputs)


def _record(section: str, case: str, impl: str, fn, **extra):
    """Runs fn() -> dict of figures (or raises); appends one row either way and prints it."""
    row = {"section": section, "case": case, "impl": impl}
    start = time.perf_counter()
    if start > DEADLINE[0]:
        row["skipped"] = "over the --budget"
        ROWS.append(row)
        return row
    try:
        row.update(fn())
    except Exception as e:  # a compile failure is a result here
        row["error"] = f"{type(e).__name__}: {e}"[:1500]
        row["trace"] = traceback.format_exc()[-1500:]
    row["wall_s"] = round(time.perf_counter() - start, 2)
    row.update(extra)
    ROWS.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    return row


def bench_ceilings(quick, repeats):
    n = 1 << (20 if quick else 30)  # 4 GiB of float32 on the GPU

    def copy():
        xs = [jnp.full((n,), float(i + 1), jnp.float32) for i in range(2)]
        t = _time(jax.jit(lambda x: x * 2.0), [(x,) for x in xs], repeats)
        return {"ms": t * 1e3, "GB/s": 2 * 4 * n / t / 1e9}

    def matmul(dtype):
        s = 1024 if quick else 8192
        keys = jax.random.split(jax.random.key(0), 2)
        ab = [(jax.random.normal(k, (s, s), dtype), jax.random.normal(k, (s, s), dtype) * 0.5) for k in keys]
        t = _time(jax.jit(lambda a, b: a @ b), ab, repeats)
        return {"ms": t * 1e3, "TFLOP/s": 2 * s**3 / t / 1e12}

    _record("ceiling", "device copy (bytes read + written)", "xla", copy)
    _record("ceiling", "matmul bf16 8192^3", "xla", lambda: matmul(jnp.bfloat16))
    _record("ceiling", "matmul fp32 8192^3 (default precision)", "xla", lambda: matmul(jnp.float32))


def _assign_inputs(n, d, k, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    out = []
    for kk in keys:
        kx, kc = jax.random.split(kk)
        x = jax.random.normal(kx, (n, d), jnp.float32)
        c = x[jax.random.choice(kc, n, (k,), replace=False)] + 0.1 * jax.random.normal(kc, (k, d))
        out.append((x.astype(dtype), c.astype(dtype)))
    return out


def bench_assign(quick, repeats, interpret):
    n, d = (4096, 32) if quick else (1_000_000, 128)
    gpu = backend("assign", "pallas_gpu")
    variants = {
        "default": gpu.BlockSizes(),
        "256x128 w8 s3": gpu.BlockSizes(block_n=256, block_k=128, num_warps=8, num_stages=3),
        "128x64 w4 s3": gpu.BlockSizes(block_n=128, block_k=64, num_warps=4, num_stages=3),
        "256x64 w8 s2": gpu.BlockSizes(block_n=256, block_k=64, num_warps=8, num_stages=2),
        "64x64 w4 s2": gpu.BlockSizes(block_n=64, block_k=64, num_warps=4, num_stages=2),
    }
    for k in (64, 256) if quick else (1024, 8192):
        for dtype in (jnp.float16, jnp.bfloat16, jnp.float32):
            inputs = _assign_inputs(n, d, k, dtype, k)
            case = f"n={n} d={d} k={k} {jnp.dtype(dtype).name}"
            flops = 2 * n * k * d
            xla = jax.jit(lambda x, c: assign(x, c, impl="xla"))
            ref = jax.block_until_ready(xla(*inputs[0]))
            base = _record(
                "assign",
                case,
                "xla",
                lambda: {"ms": (t := _time(xla, inputs, repeats)) * 1e3, "TFLOP/s": flops / t / 1e12},
            )
            names = list(variants) if dtype == jnp.float16 or quick else ["default", "128x64 w4 s3", "64x64 w4 s2"]
            for name in names:

                def run(block=variants[name]):
                    fn = jax.jit(lambda x, c: gpu.assign(x, c, block=block, interpret=interpret))
                    codes, dists = fn(*inputs[0])
                    same = float(jnp.mean(codes == ref[0]))
                    gap = float(jnp.max(jnp.abs(dists - ref[1]) / (1.0 + jnp.abs(ref[1]))))
                    t = _time(fn, inputs, repeats)
                    return {
                        "ms": t * 1e3,
                        "TFLOP/s": flops / t / 1e12,
                        "codes_equal_xla": same,
                        "max_rel_dist_gap": gap,
                    }

                row = _record("assign", case, f"pallas_gpu {name}", run)
                if "ms" in row and "ms" in base:
                    row["speedup_vs_xla"] = base["ms"] / row["ms"]


def bench_kmeans(quick, repeats, interpret):
    shapes = [(8192, 32, 64)] if quick else [(1_000_000, 128, 1024), (1_000_000, 128, 8192), (8_000_000, 128, 1024)]
    few, many = (1, 3) if quick else (3, 13)
    for n, d, k in shapes:
        x = jax.random.normal(jax.random.key(n + k), (n, d), jnp.float32)
        init = x[:k]
        x16 = x.astype(jnp.float16)
        variants = [("auto", "auto")]  # sort against scatter: the kmeans_parts section
        variants += [("xla", "auto")] if k == 1024 and n <= 1_000_000 or quick else []
        for impl, update in variants:

            def run(impl=impl, update=update):
                times = {}
                for iters in (few, many):
                    fit = jax.jit(
                        lambda x, it=iters: vqlib.fit(
                            x, "kmeans", k=k, init=init, max_iter=it, tol=0.0, impl=impl, update=update
                        )
                    )
                    jax.block_until_ready(fit(x16))  # compile
                    times[iters] = _time(fit, [(x16,)], max(3, repeats // 10))
                per_iter = (times[many] - times[few]) / (many - few)
                ran = int(fit(x16).stats.num_iters)  # tol = 0 stops early only if the inertia rises
                return {"ms_per_iter": per_iter * 1e3, f"ms_total_{many}_iters": times[many] * 1e3, "iters_run": ran}

            _record("kmeans", f"n={n} d={d} k={k} float16", f"assign {impl}, update {update}", run)


def bench_kmeans_parts(quick, repeats, interpret):
    """One Lloyd pass taken apart: the assignment, the centroid sums (sort-inverse or plain
    scatter-add), and the far-point top-k that re-seeds empty clusters (only in passes that
    leave one empty)."""
    from vqlib.codebooks import _kmeans as km

    shapes = [(8192, 32, 64)] if quick else [(1_000_000, 128, 1024), (1_000_000, 128, 8192)]
    for n, d, k in shapes:
        x = jax.random.normal(jax.random.key(n + k), (n, d), jnp.float32).astype(jnp.float16)
        c = x[:k]
        codes, d2 = jax.block_until_ready(jax.jit(assign)(x, c))
        parts = {
            "assign (auto)": (jax.jit(assign), (x, c)),
            "sums sort": (jax.jit(lambda x, codes: km._cluster_sums(x, None, codes, k, "sort")), (x, codes)),
            "sums scatter": (jax.jit(lambda x, codes: km._cluster_sums(x, None, codes, k, "scatter")), (x, codes)),
            "far top-k": (jax.jit(lambda d2, x: km._top_far(d2, x, k)), (d2, x)),
        }
        for name, (fn, args) in parts.items():
            _record(
                "kmeans_parts",
                f"n={n} d={d} k={k} float16",
                name,
                lambda fn=fn, args=args: {"ms": _time(fn, [args], max(5, repeats // 3)) * 1e3},
            )


def _lut_case(layout: str, bits: int, out: int, inn: int, key):
    """A (out, inn) LUTWeight at `bits` bits per weight in one of the four layouts."""
    kc_, kb = jax.random.split(key)
    if layout == "scalar":  # per-row codebooks for groups of 128 columns, 2^bits levels
        codes = jax.random.randint(kc_, (1, out, inn), 0, 2**bits).astype(jnp.uint8)
        return lut_weight("scalar", codes, jax.random.normal(kb, (out, inn // 128, 2**bits)), group=128)
    if layout == "vq":  # one shared codebook of 2^(bits * v) vectors of v columns (GPTVQ-like)
        v = {2: 4, 3: 2, 4: 2}[bits]
        kc = 2 ** (bits * v)
        codes = jax.random.randint(kc_, (1, out, inn // v), 0, kc).astype(jnp.uint8 if kc <= 256 else jnp.int32)
        return lut_weight("vq", codes, jax.random.normal(kb, (1, kc, v)))
    if layout == "aq":  # `bits` additive codebooks of 256 vectors of 8 columns (AQLM 2x8, 3x8, 4x8)
        codes = jax.random.randint(kc_, (bits, out, inn // 8), 0, 256).astype(jnp.uint8)
        return lut_weight("aq", codes, jax.random.normal(kb, (bits, 256, 8)))
    patterns = jnp.abs(jnp.round(jax.random.normal(kb, (256, 8)) * 2) / 2)  # e8p: half-integer patterns, 16-bit codes
    codes = jax.random.randint(kc_, (1, out, inn // 8), 0, 65536).astype(jnp.uint16)
    return lut_weight("e8p", codes, patterns)


LUT_VARIANTS = {  # tile shapes tried at batch 1, 2 bits (the decode-time case of the target)
    "16x128 w4 s3": dict(block_out=16, block_in=128, num_warps=4, num_stages=3),
    "32x128 w4 s3": dict(block_out=32, block_in=128, num_warps=4, num_stages=3),
    "32x256 w4 s2": dict(block_out=32, block_in=256, num_warps=4, num_stages=2),
    "64x128 w8 s3": dict(block_out=64, block_in=128, num_warps=8, num_stages=3),
}


def bench_lut_matmul(quick, repeats, interpret):
    """Device time per call from a scan over 8 weight copies (`_time_loop`), against the dense
    bf16 matmul timed the same way."""
    shapes = [(256, 512)] if quick else [(4096, 4096), (4096, 14336)]
    layouts = [("scalar", 2), ("vq", 2), ("aq", 2), ("e8p", 2), ("scalar", 3), ("vq", 3)]
    layouts += [("scalar", 4), ("vq", 4)] + ([] if quick else [("aq", 3), ("aq", 4)])
    gpu = backend("lut_matmul", "pallas_gpu")
    copies = 3 if quick else 8
    for batch in (1, 16, 4):  # the decode-time case first
        for out, inn in shapes:
            dense = [jax.random.normal(jax.random.key(i), (out, inn)).astype(jnp.bfloat16) for i in range(copies)]
            xs = [jax.random.normal(jax.random.key(10 + i), (batch, inn)).astype(jnp.bfloat16) for i in range(copies)]

            def dense_run(xs=xs, dense=dense, out=out, inn=inn):
                t = _time_loop(lambda x, w: x @ w.T, list(zip(xs, dense, strict=True)), repeats)
                return {"us": t * 1e6, "GB/s": out * inn * 2 / t / 1e9}

            d_row = _record("lut_matmul", f"{out}x{inn} b={batch}", "dense bf16", dense_run)
            for layout, bits in layouts if batch != 4 else [c for c in layouts if c[1] == 2]:
                weights = [_lut_case(layout, bits, out, inn, jax.random.key(100 + i)) for i in range(copies)]
                case = f"{out}x{inn} b={batch} {layout} {bits}-bit"
                ref = jax.block_until_ready(jax.jit(lambda x, w: lut_matmul(x, w, impl="xla"))(xs[0], weights[0]))
                blocks = {"default": gpu.BlockSizes()}
                if batch == 1 and bits == 2 and (inn == 14336 or quick):
                    blocks.update({name: gpu.BlockSizes(**b) for name, b in LUT_VARIANTS.items()})
                impls = [("xla", None)] if batch == 1 else []
                impls += [(f"pallas_gpu {name}", block) for name, block in blocks.items()]
                for impl, block in impls:

                    def run(impl=impl, block=block):
                        if block is None:
                            fn = lambda x, w: lut_matmul(x, w, impl="xla")  # noqa: E731
                        else:
                            fn = lambda x, w: gpu.lut_matmul(x, w, block=block, interpret=interpret)  # noqa: E731
                        y = jax.jit(fn)(xs[0], weights[0]).astype(jnp.float32)
                        r32 = ref.astype(jnp.float32)
                        rel = float(jnp.linalg.norm(y - r32) / jnp.linalg.norm(r32))
                        t = _time_loop(fn, list(zip(xs, weights, strict=True)), repeats)
                        code_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(weights[0]))
                        return {"us": t * 1e6, "GB/s_weight": code_bytes / t / 1e9, "rel_err_vs_xla": rel}

                    row = _record("lut_matmul", case, impl, run)
                    if "us" in row and "us" in d_row:
                        row["speedup_vs_dense_bf16"] = d_row["us"] / row["us"]


def bench_adc(quick, repeats, interpret):
    n, m, kc, q = (20_000, 16, 256, 40) if quick else (1_000_000, 16, 256, 1000)
    gpu = backend("adc_topk", "pallas_gpu")
    inputs = []
    for i in range(3):
        kt, kc_ = jax.random.split(jax.random.key(i))
        inputs.append((jax.random.normal(kt, (q, m, kc)), jax.random.randint(kc_, (n, m), 0, kc).astype(jnp.uint8)))
    for k in (10, 100):
        case = f"n={n} m={m} kc={kc} q={q} k={k}"
        xla = jax.jit(lambda t, c, k=k: adc_topk(t, c, k, impl="xla"))
        ref = jax.block_until_ready(xla(*inputs[0]))
        useful = n * m + q * m * kc * 4  # the codes once, the tables once (bytes)
        base = _record(
            "adc_topk",
            case,
            "xla",
            lambda: {"ms": (t := _time(xla, inputs, repeats)) * 1e3, "GB/s_codes_once": useful / t / 1e9},
        )
        for name, block in {
            "onehot q16 n512": gpu.BlockSizes(),
            "gather q16 n512": gpu.BlockSizes(lookup="gather"),
            "gather q64 n256": gpu.BlockSizes(lookup="gather", block_q=64, block_n=256),
            "gather q128 n256 w8": gpu.BlockSizes(lookup="gather", block_q=128, block_n=256, num_warps=8),
        }.items():
            if name.startswith("onehot") and q > 64 and not quick:
                continue  # 2 q n m kc FLOP: seconds at q = 1000; measured at q = 16 below

            def run(block=block, k=k):
                fn = jax.jit(lambda t, c: gpu.adc_topk(t, c, k, block=block, interpret=interpret))
                d, _ = fn(*inputs[0])
                gap = float(jnp.max(jnp.abs(d - ref[0])))
                t = _time(fn, inputs, repeats)
                streamed = n * m * -(-q // block.block_q)  # the codes once per query tile
                return {
                    "ms": t * 1e3,
                    "GB/s_codes_once": useful / t / 1e9,
                    "GB/s_streamed": streamed / t / 1e9,
                    "max_abs_gap_vs_xla": gap,
                }

            row = _record("adc_topk", case, f"pallas_gpu {name}", run)
            if "ms" in row and "ms" in base:
                row["speedup_vs_xla"] = base["ms"] / row["ms"]
    # a small batch of queries, where the one-hot matmul is the natural choice
    small = [(t[:16], c) for t, c in inputs]
    for impl, fn in {
        "xla": jax.jit(lambda t, c: adc_topk(t, c, 10, impl="xla")),
        "pallas_gpu onehot": jax.jit(lambda t, c: gpu.adc_topk(t, c, 10, interpret=interpret)),
        "pallas_gpu gather": jax.jit(
            lambda t, c: gpu.adc_topk(t, c, 10, block=gpu.BlockSizes(lookup="gather"), interpret=interpret)
        ),
    }.items():
        _record(
            "adc_topk",
            f"n={n} m={m} kc={kc} q=16 k=10",
            impl,
            lambda fn=fn: {"ms": (t := _time(fn, small, repeats)) * 1e3, "GB/s_codes_once": n * m / t / 1e9},
        )


SECTIONS = {
    "ceilings": bench_ceilings,
    "assign": bench_assign,
    "kmeans_parts": bench_kmeans_parts,
    "kmeans": bench_kmeans,
    "lut_matmul": bench_lut_matmul,
    "adc": bench_adc,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    parser.add_argument("--interpret", action="store_true", help="run the Pallas kernels in the interpreter")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {list(SECTIONS)}")
    parser.add_argument("--budget", type=float, default=None, help="seconds; later cases are skipped (and say so)")
    parser.add_argument("--json", default=None, help="write every row here (rewritten after each section)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 30)
    if args.budget:
        DEADLINE[0] = time.perf_counter() + args.budget
    env = {
        "device": jax.devices()[0].device_kind,
        "platform": jax.default_backend(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(env), flush=True)
    for name in args.sections.split(","):
        SECTIONS[name](args.quick, repeats, args.interpret) if name != "ceilings" else bench_ceilings(
            args.quick, repeats
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"env": env, "rows": ROWS}, f, indent=1)


if __name__ == "__main__":
    main()
