"""C++ kernels for XLA:CPU through `jax.ffi`, compiled on first use with this machine's compiler.

A few reads have no fast form in XLA:CPU: attention over bit-packed KV codes, for one, costs a
while loop of small ops per tile (measured 0.45-0.7 ms per 512-position tile where the arithmetic
takes 0.2). Such a kernel is a C++ FFI handler (`*.cc` beside its op), built here the first time a
process asks for it: `$CXX` (else `c++`, `g++`, `clang++`) with `-O3 -march=native` against the
headers jaxlib ships (`jax.ffi.include_dir()`), into `~/.cache/vqlib/native/` (or
`$XDG_CACHE_HOME/vqlib/native`), keyed by the source, the flags, the compiler, jax / jaxlib and
the CPU, written atomically (a temporary file, then a rename), so processes building at once do
not clash and a stale library is never loaded. The ops' dispatchers try the "native" backend only
on a CPU and only when the build succeeds; otherwise (no compiler, a failed build) they go on to
their XLA path, which computes the same result. `native_error(source)` says why a build failed.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax

from vqlib._compile_cache import default_path

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")
ENV = "VQLIB_NATIVE"  # "off": never build (every op takes its XLA path)


def cache_dir() -> pathlib.Path:
    return default_path().parent / "native"


@functools.cache
def compiler() -> tuple[str, str] | None:
    """(path, first line of `--version`) of the C++ compiler, or None when there is none."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        path = shutil.which(name) if name else None
        if path:
            try:
                out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=True)
            except (OSError, subprocess.SubprocessError):
                continue
            return path, out.stdout.splitlines()[0] if out.stdout else ""
    return None


def _cpu() -> str:
    """What `-march=native` depends on: the machine and, on Linux, the CPU's model and flags."""
    text = ""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith(("model name", "flags", "Features"))]
        text = "\n".join(sorted(set(lines)))
    except OSError:
        pass
    return platform.machine() + "\n" + text


@functools.cache
def _build(source: str) -> tuple[str | None, str]:
    """(path of the built library, "") or (None, why not); once per process and source."""
    if os.environ.get(ENV, "").lower() == "off":
        return None, f"native kernels are off (environment variable {ENV}=off)"
    found = compiler()
    if found is None:
        return None, "no C++ compiler found (set CXX, or install g++ / clang++)"
    cxx, version = found
    src = pathlib.Path(source)
    include = jax.ffi.include_dir()
    import jaxlib

    key = hashlib.sha256(
        "\n".join([src.read_text(), " ".join(FLAGS), version, jax.__version__, jaxlib.__version__, _cpu()]).encode()
    ).hexdigest()[:16]
    out_dir = cache_dir()
    target = out_dir / f"{src.stem}-{key}.so"
    if target.exists():
        return str(target), ""
    try:
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
    except OSError as e:
        return None, f"cannot write the library to {out_dir}: {e} (set XDG_CACHE_HOME to a writable folder)"
    cmd = [cxx, *FLAGS, "-isystem", include, str(src), "-o", tmp]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        os.unlink(tmp)
        return None, f"building {src.name} failed: {e}"
    if run.returncode != 0:
        os.unlink(tmp)
        return None, f"building {src.name} failed ({' '.join(cmd)}):\n{run.stderr[-2000:]}"
    os.replace(tmp, target)  # atomic: another process building the same key wrote the same bytes
    return str(target), ""


@functools.cache
def _registered(source: str, symbol: str, target_name: str) -> str:
    """Loads the library of `source` and registers `symbol` as FFI target `target_name` on the CPU;
    "" on success, else why not."""
    path, why = _build(source)
    if path is None:
        return why
    try:
        handler = getattr(ctypes.cdll.LoadLibrary(path), symbol)
    except (OSError, AttributeError) as e:
        return f"loading {path} failed: {e}"
    jax.ffi.register_ffi_target(target_name, jax.ffi.pycapsule(handler), platform="cpu")
    return ""


def native_error(source: str, symbol: str, target_name: str) -> str:
    """ "" when the handler `symbol` of `source` is built and registered as `target_name`, else the
    reason it is not (the first call builds, a few seconds)."""
    return _registered(str(source), symbol, target_name)


def require_native(source: str, symbol: str, target_name: str) -> None:
    """NotImplementedError naming the reason when the native backend cannot run here."""
    if jax.default_backend() != "cpu":
        raise NotImplementedError(
            f"impl='native' is a C++ kernel for the CPU; the default backend is {jax.default_backend()!r}: "
            "use impl='auto' or impl='xla'"
        )
    why = native_error(source, symbol, target_name)
    if why:
        raise NotImplementedError(f"impl='native' is not available: {why}; use impl='auto' or impl='xla'")
