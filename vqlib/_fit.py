"""The front door: `vqlib.fit(x, method)` and type-dispatched `encode` / `decode`.

Each method is a `Quantizer` (fit, encode, decode) in one table, as optax's alias.py maps names
to transforms; a new codebook type is one more row.
"""

from __future__ import annotations

import inspect

import jax

from vqlib import _checks
from vqlib._types import Quantizer
from vqlib.codebooks import _kmeans
from vqlib.kernels import assign as assign_op

METHODS: dict[str, tuple[type, Quantizer]] = {
    "kmeans": (_kmeans.KMeansCodebook, Quantizer(_kmeans.fit_kmeans, _kmeans.encode, _kmeans.decode)),
}


def _quantizer_for(codebook) -> Quantizer:
    for cls, quantizer in METHODS.values():
        if type(codebook) is cls:
            return quantizer
    known = ", ".join(cls.__name__ for cls, _ in METHODS.values())
    raise TypeError(f"expected a vqlib codebook ({known}), got {type(codebook).__name__}")


def fit(x, method: str, *, key=None, **options):
    """Fits a codebook of the given method to `x`.

    Args:
        x: (n, d) training vectors.
        method: one of `vqlib.METHODS` ("kmeans", ...).
        key: PRNG key; defaults to `jax.random.key(0)`, so the same call gives the same result.
        **options: the method's options, e.g. for "kmeans": k, init, max_iter, tol, sample_weight
            (see `vqlib.codebooks.fit_kmeans`).

    Returns:
        An immutable codebook pytree.

    Example:
        >>> import numpy as np, vqlib
        >>> x = np.random.default_rng(0).normal(size=(500, 8)).astype("float32")
        >>> cb = vqlib.fit(x, "kmeans", k=10)
        >>> vqlib.decode(cb, vqlib.encode(cb, x)).shape
        (500, 8)
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    fit_fn = METHODS[method][1].fit
    params = inspect.signature(fit_fn).parameters
    allowed = sorted(p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for method {method!r}; valid options are {allowed}")
    missing = [p for p in allowed if params[p].default is inspect.Parameter.empty and p not in options]
    if missing:
        raise TypeError(f"method {method!r} needs option(s) {missing}, e.g. vqlib.fit(x, {method!r}, {missing[0]}=...)")
    return fit_fn(jax.random.key(0) if key is None else key, x, **options)


def encode(codebook, x) -> jax.Array:
    """Vectors (..., d) -> int32 codes, by the codebook's own encoder."""
    return _quantizer_for(codebook).encode(codebook, x)


def decode(codebook, codes) -> jax.Array:
    """Codes -> reconstructed vectors (..., d)."""
    return _quantizer_for(codebook).decode(codebook, codes)


def assign(x, centroids) -> tuple[jax.Array, jax.Array]:
    """Nearest centroid: (n, d) points, (k, d) centroids -> (codes (n,) int32, squared distances (n,)).

    Example:
        >>> import numpy as np, vqlib
        >>> codes, d2 = vqlib.assign(np.eye(3, dtype="float32"), np.eye(3, dtype="float32")[::-1])
        >>> codes.tolist()
        [2, 1, 0]
    """
    x = _checks.check_float_array(x, "x", ndim=2)
    centroids = _checks.check_float_array(centroids, "centroids", ndim=2)
    return assign_op(x, centroids)  # checks the shapes
