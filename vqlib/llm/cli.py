"""`python -m vqlib compress MODEL --method aqlm --bits 2 -o model.vq` and `python -m vqlib ppl MODEL_OR_VQ`.

MODEL is a GGUF file or a Hugging Face folder. A user mistake (missing file, unknown method, bits
a method cannot do, bad option) raises ValueError / TypeError before any long computation and
without writing the output file; `vqlib.__main__` prints it as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import time

from vqlib._cli import check_output, parse_options
from vqlib._io import save


def add_parser(sub) -> None:
    """Adds the `compress` and `ppl` commands to an argparse sub-parser set."""
    c = sub.add_parser("compress", help="compress a Llama-family model (GGUF file or Hugging Face folder)")
    c.add_argument("model", help="GGUF file or Hugging Face folder")
    c.add_argument("--method", required=True, help="rtn, gptvq, aqlm or quip")
    c.add_argument("--bits", type=int, required=True, help="bits per weight of the codes")
    c.add_argument("-o", "--output", required=True, help=".vq file to write (atomically)")
    c.add_argument("--calibration", default=None, help="calibration text file (default: WikiText-2 validation)")
    c.add_argument("--head-bits", type=int, default=None, help="bits for the embedding / output head")
    c.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="a method option, repeatable")
    c.add_argument("--seed", type=int, default=0, help="PRNG seed of the fits (default 0)")
    c.add_argument(
        "--distill", type=int, default=0, metavar="STEPS",
        help="then fine-tune end to end against the float model for STEPS steps (vqlib.llm.distill; default 0)",
    )  # fmt: skip
    c.set_defaults(run=run)
    p = sub.add_parser("ppl", help="WikiText-2 perplexity of a model or a compressed .vq file")
    p.add_argument("model", help="GGUF file, Hugging Face folder or .vq file")
    p.add_argument("--windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--ctx", type=int, default=1024, help="window length in tokens (default 1024)")
    p.add_argument("--text", default=None, help="text file (default: WikiText-2 raw test)")
    p.set_defaults(run=run)


def _text(path, default) -> str:
    from vqlib.llm._eval import read_text, shared_file

    if path is not None:
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file")
        return read_text(path)
    return read_text(shared_file(default))  # FileNotFoundError: `vqlib.__main__` prints it as one line


def run(args: argparse.Namespace) -> None:
    import jax

    from vqlib.llm._compress import METHODS, bits_per_weight, compress, method_module
    from vqlib.llm._distill import distill
    from vqlib.llm._eval import CALIBRATION, WIKITEXT2_TEST, perplexity
    from vqlib.llm._load import load

    if not os.path.exists(args.model):
        raise ValueError(f"{args.model}: no such file or folder")
    if args.command == "compress":
        if args.method not in METHODS:
            raise ValueError(f"unknown method {args.method!r}; choose one of {', '.join(sorted(METHODS))}")
        options = parse_options(args.option)
        mod = method_module(args.method)
        mod.check_options(args.bits, dict(options))  # the method's own checks, before loading anything
        if args.head_bits is not None:
            mod.check_options(args.head_bits, dict(options))
        if args.distill < 0:
            raise ValueError(f"--distill must be >= 0 steps, got {args.distill}")
        check_output(args.output, "compressed model")
        needs_text = mod.NEEDS_CALIBRATION or args.distill
        calibration = _text(args.calibration, CALIBRATION) if needs_text else None
        model = load(args.model)
        compressed = compress(
            model,
            args.method,
            bits=args.bits,
            calibration=calibration,
            key=jax.random.key(args.seed),
            head_bits=args.head_bits,
            progress=True,
            **options,
        )
        if args.distill:
            compressed, report = distill(compressed, model, calibration, steps=args.distill, progress=True)
            print(
                f"distill: held-out KL to the float model {report['held_out_kl_before']:.4f} -> "
                f"{report['held_out_kl_after']:.4f} ({'kept' if report['kept'] else 'not kept: no better'})"
            )
        save(args.output, compressed)
        info = compressed.describe()
        print(
            f"{args.method} {args.bits}-bit: {bits_per_weight(compressed):.3f} bits per weight (all parameters), "
            f"{os.path.getsize(args.output):,} bytes, compressed in {info['seconds']:.0f} s -> {args.output}"
        )
    else:
        text = _text(args.text, WIKITEXT2_TEST)
        model = load(args.model)
        start = time.perf_counter()
        ppl = perplexity(model, text, ctx=args.ctx, max_windows=args.windows, progress=True)
        print(f"perplexity {ppl:.4f} ({time.perf_counter() - start:.0f} s)")
