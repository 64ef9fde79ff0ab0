"""Shape annotations: every public function annotates its array arguments with jaxtyping shapes, and
the annotations hold, checked at test time by a runtime checker (jaxtyping + beartype) wrapped
around the public functions while typical calls run. Library code itself calls no checker."""

import inspect
import typing

import beartype
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import vqlib
from vqlib import retrieval
from vqlib.testing import clustered

NAMESPACES = [vqlib, vqlib.codebooks, vqlib.kernels, vqlib.retrieval, vqlib.nn]
# arguments that hold arrays, by name, in public signatures
ARRAY_ARGS = {"x", "xs", "queries", "codes", "centroids", "tables", "codebook_rows", "w", "z", "bias", "packed", "y"}


def _public_functions():
    seen = {}
    for ns in NAMESPACES:
        for name in dir(ns):
            fn = getattr(ns, name)
            if name.startswith("_") or not inspect.isfunction(fn) or not fn.__module__.startswith("vqlib"):
                continue
            seen[f"{fn.__module__}.{fn.__qualname__}"] = (ns, name, fn)
    return seen


def _is_jaxtyped(annotation) -> bool:
    args = typing.get_args(annotation) or (annotation,)
    return any(isinstance(a, type) and issubclass(a, jaxtyping.AbstractArray) for a in args)


def test_every_public_array_argument_has_a_shape_annotation():
    missing = []
    for qualname, (_, _, fn) in sorted(_public_functions().items()):
        hints = typing.get_type_hints(fn, include_extras=True)
        for param in inspect.signature(fn).parameters:
            if param in ARRAY_ARGS and not _is_jaxtyped(hints.get(param)):
                missing.append(f"{qualname}({param})")
    assert not missing, f"public array arguments without a jaxtyping annotation: {missing}"


@pytest.fixture
def checked(monkeypatch):
    """Every annotated public function, replaced in its namespaces by a runtime-checked copy."""
    for ns, name, fn in _public_functions().values():
        hints = typing.get_type_hints(fn, include_extras=True)
        if any(_is_jaxtyped(h) for h in hints.values()):
            monkeypatch.setattr(ns, name, jaxtyping.jaxtyped(typechecker=beartype.beartype)(fn))


METHODS = {
    "kmeans": dict(k=16),
    "pq": dict(m=4, k=16),
    "opq": dict(m=4, k=16, max_iter=1),
    "rvq": dict(m=2, k=16),
    "aq": dict(m=2, k=16, max_iter=1),
    "e8": dict(bits=1),
    "e8p": dict(bits=2),
    "turboquant": dict(bits=3),
    "turboquant_prod": dict(bits=3),
    "qjl": {},
    "rabitq": {},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_codebook_calls_satisfy_their_annotations(checked, method):
    x = np.asarray(clustered(jax.random.key(0), 600, 16))
    cb = vqlib.fit(x, method, **METHODS[method])
    codes = vqlib.encode(cb, x)
    vqlib.decode(cb, codes)
    vqlib.inner_product(cb, codes.reshape(len(x), -1) if codes.ndim == 1 else codes, x[:3])
    vqlib.encode(cb, jnp.asarray(x).reshape(2, 300, 16))
    if vqlib.codebooks.has_tables(cb):
        vqlib.adc_tables(cb, x[:3], metric="l2")


def test_kernel_and_index_calls_satisfy_their_annotations(checked):
    x = np.asarray(clustered(jax.random.key(1), 2000, 16))
    vqlib.assign(x, x[:8])
    vqlib.kernels.adc_topk(jnp.ones((2, 4, 16)), jnp.zeros((50, 4), jnp.int32), 5)
    w = vqlib.kernels.lut_weight("vq", jnp.zeros((1, 8, 4), jnp.int32), jnp.ones((1, 16, 4)))
    vqlib.kernels.lut_matmul(jnp.ones((3, 16)), w)
    packed = vqlib.codebooks.pack_codes(np.zeros((5, 4), np.int32), 4)
    vqlib.codebooks.unpack_codes(packed, 4, 4)
    index = retrieval.build(x, "ivfpq", nlist=8, m=4, keep_vectors=True)
    retrieval.search(index, x[:5], k=3, nprobe=2, rerank=10)
    retrieval.add(index, x[:10] + 1.0)
