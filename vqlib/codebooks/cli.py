"""`vqlib fit`, `vqlib encode`, `vqlib decode`: codebooks from and to .npy files.

vqlib fit x.npy --method pq --m 8 -o pq.vq       # any vqlib.fit method and its options
vqlib encode pq.vq x.npy -o codes.npy            # (n, w) int32 codes
vqlib decode pq.vq codes.npy -o x_hat.npy        # (n, d) float32 reconstructions
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import numpy as np

from vqlib import _io, codebooks, testing
from vqlib._cli import check_output, parse_options, print_json, read_npy

# options of vqlib.fit with their own flag; anything else goes through --option NAME=VALUE
_FLAGS = {
    "k": (int, "codes per codebook (kmeans: clusters; PQ / RVQ / AQ: default 256)"),
    "m": (int, "codebooks per vector (PQ / OPQ: subspaces, a divisor of d; RVQ / AQ: stages)"),
    "bits": (int, "bits per coordinate (turboquant, turboquant_prod, e8, e8p)"),
    "beam": (int, "beam width of RVQ / AQ encoding"),
    "max_iter": (int, "Lloyd / training iterations"),
    "kmeans_iter": (int, "k-means iterations per stage or subspace (RVQ, AQ, OPQ)"),
    "icm_iter": (int, "ICM iterations of AQ encoding"),
    "metric": (str, "l2, ip or cos (kmeans: cos is spherical k-means)"),
}
_SAMPLE = 10_000  # rows on which `fit` reports the relative error


def add_parsers(sub) -> None:
    """Adds `fit`, `encode` and `decode` to an argparse sub-parser set."""
    f = sub.add_parser(
        "fit",
        help="fit a codebook (k-means, PQ, RVQ, AQ, E8P, TurboQuant, ...) to a .npy matrix and save it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("data", help="(n, d) float .npy file (read memory-mapped)")
    f.add_argument("-o", "--output", required=True, help="codebook file to write (atomically; vqlib.load reads it)")
    f.add_argument(
        "--method", default="kmeans", help=f"a vqlib.fit method: {', '.join(codebooks.methods())} (default kmeans)"
    )
    for name, (kind, text) in _FLAGS.items():
        f.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, help=text)
    f.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other option of the method, VALUE read as JSON when it parses (e.g. --option tol=1e-4); repeatable",
    )
    f.add_argument(
        "--seed", type=int, default=0, help="seed of the fit (default 0; the same seed gives the same codebook)"
    )
    f.add_argument("--json", action="store_true", help="print a JSON summary instead")
    f.set_defaults(run=run_fit)

    e = sub.add_parser("encode", help="codes of each row of a .npy matrix under a saved codebook")
    e.add_argument("codebook", help="codebook file from `vqlib fit` or vqlib.save")
    e.add_argument("data", help="(n, d) float .npy file")
    e.add_argument("-o", "--output", required=True, help=".npy file for the int32 codes: (n, w), or (n,) for k-means")
    e.add_argument("--json", action="store_true", help="print a JSON summary instead")
    e.set_defaults(run=run_encode)

    d = sub.add_parser("decode", help="vectors back from their codes under a saved codebook")
    d.add_argument("codebook", help="codebook file from `vqlib fit` or vqlib.save")
    d.add_argument("codes", help="(n, w) or, for k-means, (n,) integer .npy file from `vqlib encode`")
    d.add_argument("-o", "--output", required=True, help=".npy file for the (n, d) float32 vectors")
    d.add_argument("--json", action="store_true", help="print a JSON summary instead")
    d.set_defaults(run=run_decode)


def _options(args) -> dict:
    flags = {name: getattr(args, name) for name in _FLAGS if getattr(args, name) is not None}
    return flags | parse_options(args.option)


def load_codebook(path: str):
    """A codebook saved by `vqlib fit` / vqlib.save; ValueError naming the path for anything else."""
    if not os.path.exists(path):
        raise ValueError(f"codebook file {path} does not exist; fit one with `vqlib fit DATA.npy -o {path}`")
    obj = _io.load(path)
    if not codebooks.is_codebook(obj):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a codebook; pass a file written by `vqlib fit`")
    return obj


def _summary(args, text: str, **fields) -> None:
    if args.json:
        print_json(fields)
    else:
        print(text)


def run_fit(args) -> None:
    import jax

    check_output(args.output, "codebook")
    x = read_npy(args.data, "data", 2)
    options = _options(args)
    start = time.perf_counter()  # vqlib.fit checks the method and options before it reads x
    cb = jax.block_until_ready(codebooks.fit(x, args.method, key=jax.random.key(args.seed), **options))
    seconds = time.perf_counter() - start
    _io.save(args.output, cb)
    sample = np.asarray(x[:_SAMPLE])
    variance = float(np.mean(np.sum((sample - sample.mean(0)) ** 2, axis=1), dtype=np.float64))
    err = testing.mse(sample, codebooks.decode(cb, codebooks.encode(cb, sample)))
    relative = err / variance if variance > 0 else float("nan")
    bits = codebooks.code_layout(cb).bits_per_vector
    _summary(
        args,
        f"fitted {args.method} ({type(cb).__name__}, {bits / 8:g} bytes per vector) on {x.shape[0]:,} x {x.shape[1]} "
        f"in {seconds:.1f} s; MSE / variance {relative:.4g} on the first {len(sample):,} rows -> {args.output}",
        method=args.method,
        type=type(cb).__name__,
        options=options,
        n=int(x.shape[0]),
        d=int(x.shape[1]),
        bits_per_vector=int(bits),
        seconds=seconds,
        mse=err,
        relative_mse=relative,
        output=args.output,
    )


def run_encode(args) -> None:
    check_output(args.output, "codes")
    cb = load_codebook(args.codebook)
    x = np.asarray(read_npy(args.data, "data", 2))
    _apply_and_save(
        args, functools.partial(codebooks.encode, cb), x, np.int32, "encoded {n:,} vectors into {shape} int32 codes"
    )


def run_decode(args) -> None:
    check_output(args.output, "vectors")
    cb = load_codebook(args.codebook)
    codes = read_npy(args.codes, "codes", (1, 2))  # (n,) for k-means, (n, w) otherwise
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes file {args.codes} holds {codes.dtype} values; codes are integers (`vqlib encode`)")
    _apply_and_save(
        args,
        functools.partial(codebooks.decode, cb),
        np.asarray(codes),
        np.float32,
        "decoded {n:,} codes into {shape} float32 vectors",
    )


def _apply_and_save(args, fn, inputs: np.ndarray, dtype, text: str) -> None:
    """`fn(inputs)` timed, saved to args.output as `dtype` and summarised (`text` formats n and shape)."""
    start = time.perf_counter()
    out = np.asarray(fn(inputs), dtype)
    seconds = time.perf_counter() - start
    np.save(args.output, out)
    n = int(inputs.shape[0])
    line = text.format(n=n, shape=out.shape) + f" in {seconds:.1f} s -> {args.output}"
    _summary(args, line, n=n, shape=list(out.shape), seconds=seconds, output=args.output)
