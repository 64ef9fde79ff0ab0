"""JAX's persistent compilation cache, on for vqlib's users unless they choose otherwise.

vqlib's pipelines compile on first use: building an IVF index of 100k GloVe vectors spends 5-7 s
of its 11 s (IVF-Flat) and 10-12 s of its 24 s (IVF-PQ) compiling on a 2-core CPU (measured). With
JAX's persistent cache a second process reads that code from disk instead. `import vqlib` turns
the cache on at `~/.cache/vqlib/jax` (or `$XDG_CACHE_HOME/vqlib/jax`) when

- the environment variable `VQLIB_COMPILATION_CACHE` is unset (a path there moves the cache;
  `off` turns it off), and
- JAX's own cache is not configured already (`JAX_COMPILATION_CACHE_DIR` or
  `jax.config.jax_compilation_cache_dir`): a user's choice always wins.

Every program is written, however fast it compiled (JAX's default skips those under a second:
a PQ fast-scan build runs about 100 small programs, and with that default a later process still
spent 5.8 s of a 7.7 s build compiling them; with all of them cached, 1.8 s), and the directory is
capped at 2 GiB where the `filelock` package is installed (least recently used entries go
first; without it JAX cannot cap the directory). The setting is JAX's, so it covers the
user's own programs too while vqlib's cache is the one in use. Entries are keyed by
the program, the JAX / XLA versions and the flags, so a stale entry is never read. The cache is
trusted code: keep it in a directory only you can write.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import jax

ENV = "VQLIB_COMPILATION_CACHE"
MAX_BYTES = 2 * 1024**3


def default_path() -> pathlib.Path:
    """Where vqlib keeps compiled programs by default."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "vqlib" / "jax"


def enable_compilation_cache(path=None, *, min_compile_seconds: float = 0.0) -> pathlib.Path:
    """Turns JAX's persistent compilation cache on at `path` (default: `default_path()`).

    Args:
        path: the cache directory (created, readable and writable by this user only).
        min_compile_seconds: programs that compile faster are not written (0: every program).

    Returns:
        The cache directory.

    Example:
        >>> import vqlib
        >>> vqlib.enable_compilation_cache("/tmp/my-jax-cache")  # doctest: +SKIP
        PosixPath('/tmp/my-jax-cache')
    """
    if min_compile_seconds < 0:
        raise ValueError(f"min_compile_seconds must be >= 0, got {min_compile_seconds}")
    path = pathlib.Path(path) if path is not None else default_path()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    if importlib.util.find_spec("filelock") is not None:  # JAX's size cap needs it (else JAX raises)
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path


def enable_by_default() -> pathlib.Path | None:
    """The import-time choice described in the module docstring; never raises (a cache that
    cannot be created leaves JAX as it was)."""
    choice = os.environ.get(ENV)
    if choice is not None and choice.strip().lower() in ("", "0", "off", "false", "no"):
        return None
    if jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    try:
        return enable_compilation_cache(choice or None)
    except OSError:
        return None
