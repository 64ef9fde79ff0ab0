"""What every command of `python -m vqlib` does with its input and output: .npy files read
memory-mapped and checked, output paths checked before any work, NAME=VALUE options, JSON on
stdout, and an exception as one line of stderr (`vqlib.__main__` prints it and exits 2).
"""

from __future__ import annotations

import json
import os
import stat

import numpy as np

_NPY_MAGIC = b"\x93NUMPY"


def read_npy(path: str, what: str, ndim: int | tuple[int, ...]) -> np.ndarray:
    """A .npy array of rank `ndim` (or one of several), memory-mapped; ValueError (naming the path and the fix) for a
    missing file, a non-.npy file, a pickled / object array or the wrong rank."""
    if not os.path.exists(path):
        raise ValueError(f"{what} file {path} does not exist")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{what} file {path} is not a regular file; pass a .npy file written by numpy.save")
    with open(path, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
    if magic != _NPY_MAGIC:
        raise ValueError(f"{what} file {path} is not a .npy file; write the array with numpy.save(path, array)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{what} file {path} is not a readable .npy file ({e}); write it with numpy.save") from None
    ranks = ndim if isinstance(ndim, tuple) else (ndim,)
    if array.ndim not in ranks:
        shape = " or ".join({1: "(n,)", 2: "(n, d)"}[r] for r in ranks)
        raise ValueError(f"{what} file {path} holds an array of shape {array.shape}; {what} must be {shape}")
    return array


def check_output(path: str, what: str) -> None:
    """ValueError (one line, with the fix) when `path` cannot be written: no such folder, or a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write the {what} to {path}: folder {folder} does not exist; create it first")
    if os.path.isdir(path):
        raise ValueError(f"cannot write the {what} to {path}: it is a folder; give a file name")


def parse_options(pairs: list[str]) -> dict:
    """`NAME=VALUE` strings as keyword arguments: VALUE read as JSON when it parses (`tol=1e-4`,
    `init="k-means++"`), else kept as text; dashes in NAME become underscores."""
    options = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name:
            raise ValueError(f"--option takes NAME=VALUE, got {pair!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        options[name.replace("-", "_")] = parsed
    return options


def print_json(obj) -> None:
    """One JSON document on stdout (what `--json` prints, for scripts)."""
    print(json.dumps(obj, indent=1))


def one_line(e: BaseException) -> str:
    """An exception's message on one line (an OSError as `path: reason`)."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        message = f"{e.filename}: {e.strerror}"
    else:
        message = str(e) or type(e).__name__
    return " ".join(message.split())
