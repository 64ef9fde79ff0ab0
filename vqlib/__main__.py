"""The command line, `vqlib` or `python -m vqlib`: this module parses and dispatches; each command group
lives beside what it drives (`vqlib.codebooks.cli`, `vqlib.retrieval.cli`, `vqlib.retrieval.demo`,
`vqlib.llm.cli`, `vqlib._bench`).

    vqlib demo [--size small|full] [--json]        vqlib and faiss-cpu side by side on generated data
    vqlib fit DATA.npy --method pq --m 8 -o cb.vq  fit a codebook to a .npy matrix and save it
    vqlib encode cb.vq DATA.npy -o codes.npy       codes of each row
    vqlib decode cb.vq codes.npy -o x_hat.npy      rows back from their codes
    vqlib index build|search|info ...              ANN indexes (`vqlib.retrieval.cli`)
    vqlib bench NAME [--json]                      a benchmark of benchmarks/ at a small size
    vqlib compress | ppl ...                       LLM weights: compress a model, WikiText-2 perplexity

A user mistake (a missing or unreadable file, an option the method needs, a bad value) prints one
line on stderr, `vqlib <command>: error: <what, and the fix>`, and exits with code 2, never a
traceback; `VQLIB_TRACEBACK=1` shows the traceback (for bug reports). `--json` prints one JSON
document on stdout for scripts; progress bars go to stderr, and only on a terminal.
"""

from __future__ import annotations

import argparse
import os
import sys

from vqlib._cli import one_line

_EPILOG = "Each command has its own --help. Docs: README.md; results: benchmarks/RESULTS.md."


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every command (for `main` and for the docs)."""
    from vqlib import _bench
    from vqlib.codebooks import cli as codebooks_cli
    from vqlib.llm import cli as llm_cli
    from vqlib.retrieval import cli as retrieval_cli
    from vqlib.retrieval import demo

    parser = argparse.ArgumentParser(
        prog="vqlib",
        description="vqlib: vector quantization and clustering in JAX, from the command line.",
        epilog=_EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_parser(sub)
    codebooks_cli.add_parsers(sub)
    retrieval_cli.add_parser(sub)
    _bench.add_parser(sub)
    llm_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Runs one command; user mistakes exit with code 2 and one line on stderr."""
    args = build_parser().parse_args(argv)  # usage errors: argparse prints them and exits 2
    try:
        args.run(args)
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        if os.environ.get("VQLIB_TRACEBACK"):
            raise
        command = " ".join(["vqlib", args.command] + ([args.index_command] if args.command == "index" else []))
        print(f"{command}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
