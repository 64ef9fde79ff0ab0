"""`vqlib bench NAME`: one of the repository's benchmark scripts (benchmarks/) at a small size.

The full runs (the figures of benchmarks/RESULTS.md) are `python benchmarks/<script>.py`; this
command runs the same script with its quick settings, writes its JSON (and plot) to a temporary
folder, never over the recorded results, and prints the script's output (or, with --json, its
JSON). It needs a source checkout (`pip install -e .` from the repository), where benchmarks/ is.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

# name -> (script, its quick arguments; "{out}" is a JSON path in a temporary folder, what it measures)
BENCHMARKS = {
    "kmeans": ("kmeans_cpu.py", ["--quick", "--repeats", "1", "--out", "{out}"], "k-means s/iter vs faiss, sklearn"),
    "codebooks": ("codebooks_cpu.py", ["--quick", "--out", "{out}"], "PQ / OPQ / RVQ / AQ vs faiss: time, MSE"),
    "rate-distortion": ("rate_distortion.py", ["--quick", "--out", "{out}"], "MSE and IP error vs bits"),
    "ann": ("ann.py", ["--quick", "--n", "20000"], "IVF indexes vs faiss: recall@10, QPS"),
    "dkm": ("dkm_digits.py", ["--quick", "--out", "{out}"], "DKM palettisation of an MLP on digits"),
    "kernels": (
        "gpu_kernels.py",
        ["--quick", "--repeats", "1", "--sections", "ceilings"],
        "the device's copy and matmul ceilings at tiny sizes (the kernel figures need a GPU: gpu_session.sh)",
    ),
}


def add_parser(sub) -> None:
    listing = "\n".join(f"  {name:<16} benchmarks/{script}: {what}" for name, (script, _, what) in BENCHMARKS.items())
    p = sub.add_parser(
        "bench",
        help="run a benchmark of benchmarks/ at a small size",
        description=__doc__ + "\nbenchmarks:\n" + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=tuple(BENCHMARKS), metavar="NAME", help=f"one of {', '.join(BENCHMARKS)}")
    p.add_argument("--json", action="store_true", help="print the benchmark's JSON result (its output goes to stderr)")
    p.set_defaults(run=run)


def benchmarks_folder() -> pathlib.Path:
    """benchmarks/ of the source checkout this vqlib is installed from; ValueError if there is none."""
    folder = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    if not (folder / "kmeans_cpu.py").is_file():
        raise ValueError(
            f"`vqlib bench` runs the scripts in the repository's benchmarks/ folder, and {folder} is not there; "
            "install vqlib from a source checkout (git clone, then pip install -e .)"
        )
    return folder


def run(args) -> None:
    script, options, _ = BENCHMARKS[args.name]
    folder = benchmarks_folder()
    with tempfile.TemporaryDirectory(prefix="vqlib-bench-") as tmp:
        out = os.path.join(tmp, f"{args.name}.json")
        argv = [sys.executable, str(folder / script), *(a.replace("{out}", out) for a in options)]
        done = subprocess.run(argv, cwd=folder.parent, stdout=sys.stderr if args.json else None, check=False)
        if done.returncode != 0:
            raise OSError(f"benchmarks/{script} exited with status {done.returncode} (its output is above)")
        if args.json:
            if not os.path.exists(out):
                result = dict(name=args.name, script=f"benchmarks/{script}", json=None)
            else:
                with open(out) as f:
                    result = dict(name=args.name, script=f"benchmarks/{script}", result=json.load(f))
            print(json.dumps(result, indent=1))
