"""One dispatcher for every kernel op: backend names, the "auto" order per device, lazy imports.

"auto" tries the Pallas backend of the current device first and ends at "xla"; on CPU an op with a
"native" backend (a C++ FFI handler, `vqlib.kernels._native`) tries it first, and an op with a
"faiss" backend (faiss-cpu's SIMD / BLAS loops, called through `jax.pure_callback`, so it also
runs inside jit) tries it first when faiss is importable and the op's `prefer_faiss(args)` says the
shapes are in the range where it was measured faster. A backend that cannot take the inputs
raises NotImplementedError at trace time and the next one is tried. An explicit `impl` is tried
alone, so it never falls back silently: when it refuses, the caller gets an ExceptionGroup holding
its NotImplementedError (which says why and what to pass instead).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Literal

import jax

Impl = Literal["auto", "xla", "reference", "pallas_gpu", "pallas_tpu", "faiss", "native"]
PALLAS = ("pallas_gpu", "pallas_tpu")
_PLATFORM = {"pallas_gpu": ("gpu", "cuda", "rocm"), "pallas_tpu": ("tpu",)}


def platform() -> str:
    """The platform of the default device: "cpu", "gpu" or "tpu"."""
    return jax.default_backend()


@functools.cache
def faiss_available() -> bool:
    """Whether faiss-cpu can be imported (checked once)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def auto_order(backends: Mapping[str, str], use_faiss: bool = False, use_pallas: bool = True) -> tuple[str, ...]:
    """Backends "auto" tries on this device: its Pallas kernel when one exists and `use_pallas`
    (on CPU, "faiss" when `use_faiss` and faiss is importable, and a "native" C++ kernel), then
    "xla" (or "reference" for an op without an XLA backend)."""
    mine = tuple(name for name in PALLAS if use_pallas and name in backends and platform() in _PLATFORM[name])
    if use_faiss and "faiss" in backends and platform() == "cpu" and faiss_available():
        mine = ("faiss", *mine)
    if "native" in backends and platform() == "cpu":
        mine = ("native", *mine)
    return (*mine, "xla" if "xla" in backends else "reference")


def check_impl(
    impl: str, backends: Mapping[str, str], use_faiss: bool = False, use_pallas: bool = True
) -> tuple[str, ...]:
    """The backends to try, in order; ValueError for an unknown name."""
    if impl == "auto":
        return auto_order(backends, use_faiss, use_pallas)
    if impl not in backends:
        raise ValueError(f"impl must be one of {sorted(['auto', *backends])}, got {impl!r}")
    return (impl,)


def require_platform(name: str, interpret: bool) -> None:
    """NotImplementedError when compiled Pallas backend `name` cannot run on this device."""
    if interpret or platform() in _PLATFORM[name]:
        return
    raise NotImplementedError(
        f"impl={name!r} needs a {_PLATFORM[name][0].upper()} (the default backend is {platform()!r}); "
        "pass interpret=True to run the kernel in the Pallas interpreter, or use impl='xla' or impl='auto'"
    )


def load(path: str) -> Callable:
    """'package.module:function' -> the function, imported on first use (Pallas stays unimported on CPU)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def dispatch(
    op: str,
    impl: str,
    backends: Mapping[str, str],
    args: tuple,
    *,
    interpret: bool,
    prefer_faiss: Callable[..., bool] | None = None,
    prefer_pallas: Callable[..., bool] | None = None,
    **kwargs,
):
    """Calls the first backend of `check_impl(impl)` that accepts the inputs; "auto" includes the
    faiss backend when `prefer_faiss(*args)` is true, and the device's Pallas kernel unless
    `prefer_pallas(*args)` is false (shapes or dtypes where it was measured slower)."""
    errors = []
    use_faiss = impl == "auto" and prefer_faiss is not None and bool(prefer_faiss(*args))
    use_pallas = impl != "auto" or prefer_pallas is None or bool(prefer_pallas(*args))
    for name in check_impl(impl, backends, use_faiss, use_pallas):
        fn = load(backends[name])
        try:
            if name in PALLAS:
                require_platform(name, interpret)
                return fn(*args, interpret=interpret, **kwargs)
            return fn(*args, **kwargs)
        except NotImplementedError as e:
            errors.append(e)
    raise ExceptionGroup(f"no {op} implementation accepts these inputs (impl={impl!r})", errors)
