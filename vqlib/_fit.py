"""The front door: `vqlib.fit(x, method)` and type-dispatched `encode` / `decode`.

Each method is a `Quantizer` (fit, encode, decode) in one table, as optax's alias.py maps names
to transforms; a new codebook type is one more row.
"""

from __future__ import annotations

import inspect

import jax

from vqlib import _checks
from vqlib._types import CodeLayout, Quantizer
from vqlib.codebooks import _additive, _e8, _kmeans, _product, _rabitq, _turboquant
from vqlib.kernels import assign as assign_op

_PQ = (_product.encode, _product.decode, _product.layout, _product.adc_tables)
_ADDITIVE = (_additive.encode, _additive.decode, _additive.layout, _additive.adc_tables)
_E8 = (_e8.encode, _e8.decode, _e8.layout)
_TURBOQUANT = (_turboquant.encode, _turboquant.decode, _turboquant.layout)
METHODS: dict[str, tuple[type, Quantizer]] = {
    "kmeans": (_kmeans.KMeansCodebook, Quantizer(_kmeans.fit_kmeans, _kmeans.encode, _kmeans.decode, _kmeans.layout)),
    "pq": (_product.ProductCodebook, Quantizer(_product.fit_pq, *_PQ)),
    "opq": (_product.ProductCodebook, Quantizer(_product.fit_opq, *_PQ)),
    "rvq": (_additive.AdditiveCodebook, Quantizer(_additive.fit_rvq, *_ADDITIVE)),
    "aq": (_additive.AdditiveCodebook, Quantizer(_additive.fit_aq, *_ADDITIVE)),
    "e8": (_e8.E8Codebook, Quantizer(_e8.fit_e8, *_E8)),
    "e8p": (_e8.E8Codebook, Quantizer(_e8.fit_e8p, *_E8)),
    "turboquant": (_turboquant.TurboQuantCodebook, Quantizer(_turboquant.fit_turboquant, *_TURBOQUANT)),
    "turboquant_prod": (
        _turboquant.TurboQuantProdCodebook,
        Quantizer(_turboquant.fit_turboquant_prod, *_TURBOQUANT),
    ),
    "qjl": (_turboquant.QJLCodebook, Quantizer(_turboquant.fit_qjl, *_TURBOQUANT)),
    "rabitq": (
        _rabitq.RaBitQCodebook,
        Quantizer(_rabitq.fit_rabitq, _rabitq.encode, _rabitq.decode, _rabitq.layout),
    ),
}


# Codebook type -> its Quantizer; the first method of a type (e.g. "pq" for "pq" and "opq") wins.
_BY_TYPE: dict[type, Quantizer] = {}
for _cls, _quantizer in METHODS.values():
    _BY_TYPE.setdefault(_cls, _quantizer)


def register(cls: type, quantizer: Quantizer) -> None:
    """Lets `encode` / `decode` / `code_layout` / `adc_tables` take codebooks of type `cls`."""
    _BY_TYPE[cls] = quantizer


def _quantizer_for(codebook) -> Quantizer:
    quantizer = _BY_TYPE.get(type(codebook))
    if quantizer is None:
        known = ", ".join(sorted(cls.__name__ for cls in _BY_TYPE))
        raise TypeError(f"expected a vqlib codebook ({known}), got {type(codebook).__name__}")
    return quantizer


def method_quantizer(name: str) -> Quantizer:
    """The Quantizer of a method name in `METHODS`."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name][1]


def check_options(name: str, options: dict) -> None:
    """Raises TypeError for options the method's fit does not take, or required ones missing."""
    params = inspect.signature(method_quantizer(name).fit).parameters
    allowed = sorted(p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for method {name!r}; valid options are {allowed}")
    missing = [p for p in allowed if params[p].default is inspect.Parameter.empty and p not in options]
    if missing:
        raise TypeError(f"method {name!r} needs option(s) {missing}, e.g. vqlib.fit(x, {name!r}, {missing[0]}=...)")


def fit(x, method: str, *, key=None, **options):
    """Fits a codebook of the given method to `x`.

    Args:
        x: (n, d) training vectors.
        method: one of `vqlib.METHODS`: "kmeans", "pq", "opq", "rvq", "aq", "e8", "e8p",
            "turboquant", "turboquant_prod", "qjl", "rabitq".
        key: PRNG key; defaults to `jax.random.key(0)`, so the same call gives the same result.
        **options: the method's options, e.g. k, m, beam, max_iter, sample_weight (see
            `vqlib.codebooks.fit_kmeans`, `fit_pq`, `fit_opq`, `fit_rvq`, `fit_aq`, `fit_e8`,
            `fit_e8p`, `fit_turboquant`, `fit_turboquant_prod`, `fit_qjl`, `fit_rabitq`).

    Returns:
        An immutable codebook pytree.

    Example:
        >>> import numpy as np, vqlib
        >>> x = np.random.default_rng(0).normal(size=(500, 8)).astype("float32")
        >>> cb = vqlib.fit(x, "kmeans", k=10)
        >>> vqlib.decode(cb, vqlib.encode(cb, x)).shape
        (500, 8)
    """
    check_options(method, options)
    return method_quantizer(method).fit(jax.random.key(0) if key is None else key, x, **options)


def encode(codebook, x) -> jax.Array:
    """Vectors (..., d) -> int32 codes, by the codebook's own encoder."""
    return _quantizer_for(codebook).encode(codebook, x)


def decode(codebook, codes) -> jax.Array:
    """Codes -> reconstructed vectors (..., d)."""
    return _quantizer_for(codebook).decode(codebook, codes)


def code_layout(codebook) -> CodeLayout:
    """Codes per vector, codes per codebook and side bits: `code_layout(cb).bits` is the width
    `vqlib.codebooks.pack_codes` packs at, `.bits_per_vector` the storage of one vector."""
    return _quantizer_for(codebook).layout(codebook)


def adc_tables(codebook, queries, *, metric: str = "l2") -> jax.Array:
    """Queries (q, d) -> (q, m, k) lookup tables: sum_j tables[i, j, codes[j]] scores query i
    against a code row without decoding it (see `vqlib.codebooks.adc_lookup`).

    Example:
        >>> import jax, vqlib
        >>> x = jax.random.normal(jax.random.key(1), (500, 8))
        >>> cb = vqlib.fit(x, "pq", m=4, k=16)
        >>> vqlib.adc_tables(cb, x[:3]).shape
        (3, 4, 16)
    """
    quantizer = _quantizer_for(codebook)
    if quantizer.tables is None:
        raise NotImplementedError(f"{type(codebook).__name__} codes have no lookup tables; decode them instead")
    return quantizer.tables(codebook, queries, metric=metric)


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
