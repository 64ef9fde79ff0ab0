"""Times every kernel op and backend in one run and prints one table (meant for the lent GPU).

    python benchmarks/gpu_kernels.py                 # full sizes, impl "xla" and "pallas_gpu"
    python benchmarks/gpu_kernels.py --quick --impl xla   # tiny sizes: a CPU smoke run

Each case: 3 warm-up calls, then the median of --repeats calls, each on the next of 3 input
copies (rotating, so no call reads inputs left in cache by the one before), timed on the host
around `block_until_ready` (JAX exposes no device events; the dispatch overhead, ~10-20 us, is
included and matters only for the smallest LUT-matmul cases).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from vqlib.kernels import adc_topk, assign, lut_matmul, lut_weight

ROWS = []


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


def _row(op, case, impl, seconds, extra, baseline=None):
    ratio = "" if baseline is None else f"{baseline / seconds:.2f}x"
    ROWS.append((op, case, impl, f"{seconds * 1e3:.3f}", extra, ratio))


def bench_assign(impls, quick, repeats):
    n, d = (4096, 32) if quick else (1_000_000, 128)
    for k in (64, 256) if quick else (1024, 8192):
        for dtype in (jnp.float32, jnp.bfloat16):
            keys = jax.random.split(jax.random.key(k), 3)
            inputs = [(jax.random.normal(kk, (n, d)), jax.random.normal(kk, (k, d))) for kk in keys]
            inputs = [(x.astype(dtype), c.astype(dtype)) for x, c in inputs]
            base = None
            for impl in impls:
                fn = jax.jit(lambda x, c, impl=impl: assign(x, c, impl=impl))
                t = _time(fn, inputs, repeats)
                base = t if impl == "xla" else base
                tflops = 2 * n * k * d / t / 1e12
                _row("assign", f"N={n} d={d} K={k} {jnp.dtype(dtype).name}", impl, t, f"{tflops:.1f} TFLOP/s", base)


def _lut_weight(key, out, inn, bits):
    """A 2/3/4-bit weight: per-row scalar codebooks (groups of 128) at `bits` bits, codes in uint8."""
    kc, kb = jax.random.split(key)
    codes = jax.random.randint(kc, (1, out, inn), 0, 2**bits).astype(jnp.uint8)
    return lut_weight("scalar", codes, jax.random.normal(kb, (out, inn // 128, 2**bits)), group=128)


def bench_lut_matmul(impls, quick, repeats):
    shapes = [(256, 256)] if quick else [(4096, 4096), (11008, 4096)]
    for out, inn in shapes:
        for bits in (2, 3, 4):
            weights = [_lut_weight(jax.random.key(i), out, inn, bits) for i in range(3)]
            dense = [jax.random.normal(jax.random.key(i), (out, inn)).astype(jnp.bfloat16) for i in range(3)]
            for batch in (1, 8, 64):
                xs = [jax.random.normal(jax.random.key(i), (batch, inn)).astype(jnp.bfloat16) for i in range(3)]
                t_dense = _time(jax.jit(lambda x, w: x @ w.T), list(zip(xs, dense, strict=True)), repeats)
                case = f"{out}x{inn} {bits}-bit b={batch}"
                _row("lut_matmul", case, "dense bf16", t_dense, "", t_dense)
                for impl in impls:  # "xla" is dequantize-then-matmul
                    fn = jax.jit(lambda x, w, impl=impl: lut_matmul(x, w, impl=impl))
                    t = _time(fn, list(zip(xs, weights, strict=True)), repeats)
                    _row("lut_matmul", case, impl, t, "ratio: dense / this", t_dense)


def bench_adc(impls, quick, repeats):
    n, m, kc, q, k = (20_000, 16, 256, 4, 10) if quick else (10_000_000, 16, 256, 16, 100)
    inputs = []
    for i in range(3):
        kt, kc_ = jax.random.split(jax.random.key(i))
        inputs.append((jax.random.normal(kt, (q, m, kc)), jax.random.randint(kc_, (n, m), 0, kc).astype(jnp.uint8)))
    base = None
    for impl in impls:
        fn = jax.jit(lambda t, c, impl=impl: adc_topk(t, c, k, impl=impl))
        t = _time(fn, inputs, repeats)
        base = t if impl == "xla" else base
        _row("adc_topk", f"n={n} m={m} k={kc} q={q} top{k}", impl, t, f"{n / t / 1e9:.2f} G codes/s", base)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["all", "xla", "pallas_gpu"], default="all")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    impls = ["xla", "pallas_gpu"] if args.impl == "all" else [args.impl]
    repeats = args.repeats or (5 if args.quick else 50)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    bench_assign(impls, args.quick, repeats)
    bench_lut_matmul(impls, args.quick, repeats)
    bench_adc(impls, args.quick, repeats)
    header = ("op", "case", "impl", "ms (median)", "throughput", "vs baseline")
    widths = [max(len(str(r[i])) for r in [header, *ROWS]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *ROWS]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
