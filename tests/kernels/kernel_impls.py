"""Every kernel test runs once per implementation: the reference, XLA, each Pallas kernel in the
interpreter (what CPU CI runs), and each compiled Pallas kernel when its device is present."""

import jax
import pytest

# test id -> (impl, interpret, platform the compiled kernel needs or None)
IMPLS = {
    "reference": ("reference", False, None),
    "xla": ("xla", False, None),
    "faiss": ("faiss", False, "cpu"),
    "pallas_gpu_interpret": ("pallas_gpu", True, None),
    "pallas_tpu_interpret": ("pallas_tpu", True, None),
    "pallas_gpu": ("pallas_gpu", False, "gpu"),
    "pallas_tpu": ("pallas_tpu", False, "tpu"),
}


def impls_of(backends) -> list[str]:
    """The test ids whose implementation `backends` (an op's BACKENDS table) has."""
    return [name for name, (impl, _, _) in IMPLS.items() if impl in backends]


def impl_kwargs(name: str) -> dict:
    """Keyword arguments selecting implementation `name`; skips when its device is absent."""
    impl, interpret, platform = IMPLS[name]
    if platform is not None and jax.default_backend() != platform:
        pytest.skip(f"{name} needs a {platform.upper()}")
    if impl == "faiss":
        pytest.importorskip("faiss")
    return dict(impl=impl, interpret=interpret)
