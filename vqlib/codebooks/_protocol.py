"""The codebook protocol: one registry that every layer of vqlib drives codebooks through.

A codebook type registers once, at the bottom of its own module, with `register`: its fit
methods by name and the functions below. Everything else dispatches on the codebook's type:
`vqlib.fit` / `encode` / `decode` / `code_layout` / `adc_tables` / `inner_product` here,
`vqlib.save` / `vqlib.load` (the type becomes savable and `load` checks `validate`), the indexes
of `vqlib.retrieval`, and `lut_matmul` weights through `to_lut_weight`.

What a type provides (all functions of a codebook `cb`; n vectors, q queries, w code columns):

| field | signature | required |
|---|---|---|
| encode | (cb, x (n, d)) -> codes (n, w) int32, or (n,) with `scalar_codes` | yes |
| decode | (cb, codes) -> (n, d) float32 | yes |
| layout | (cb) -> CodeLayout | yes |
| dim | (cb) -> d | yes |
| ip_tables | (cb, queries (q, d)) -> T (q, m, k), sum_j T[i, j, codes[r, j]] = <q_i, decode(codes[r])> | for tables |
| tables_available | (cb) -> bool: this instance has tables (default: when ip_tables is given) | no |
| l2_tables | (cb, queries) -> (q, m, k) summing to ||q_i - decode(codes[r])||^2 exactly | no |
| inner_product | (cb, codes, queries) -> (q, n) estimates of <q, x> from the codes | no (decode, product) |
| sq_norms | (cb, codes) -> (n,) ||x||^2 as the codes know it | no (||decode||^2) |
| lut_weight | (cb, codes, shape (out, in)) -> vqlib.kernels.LUTWeight | no |
| validate | (cb) -> None, ValueError naming the field when an invariant fails | no (finite floats) |

Without `l2_tables`, L2 tables come from the inner-product ones, ||q||^2 / m - 2 T_ip, and
`table_bias` (the per-row term an index stores beside the codes) is sq_norms; with them the bias
is None. `cos_as_l2` tells an index to rank unit vectors by the L2 estimate ||q - x||^2 / 2 - 1
rather than by -<q, x> (RaBitQ: its estimate of <q - c, r> is tighter than that of <q, r>).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Int

from vqlib import _checks
from vqlib._types import REGISTERED_TYPES, VALIDATORS, CodeLayout, Metric
from vqlib.kernels import LUTWeight

_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class CodebookType:
    """The registered behaviour of one codebook class (see the module docstring for each field)."""

    cls: type
    encode: Callable
    decode: Callable
    layout: Callable
    dim: Callable
    methods: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    ip_tables: Callable | None = None
    tables_available: Callable | None = None
    l2_tables: Callable | None = None
    inner_product: Callable | None = None
    sq_norms: Callable | None = None
    lut_weight: Callable | None = None
    validate: Callable | None = None
    scalar_codes: bool = False
    cos_as_l2: bool = False


_TYPES: dict[type, CodebookType] = {}
_METHODS: dict[str, tuple[CodebookType, Callable]] = {}
# options renamed in vqlib 0.2: a user passing the old name is told the new one
RENAMED_OPTIONS = {"nbits": "bits", "num_rounds": "max_iter", "sweeps": "icm_iter", "num_iters": "max_iter"}


def register(
    cls: type,
    *,
    encode: Callable,
    decode: Callable,
    layout: Callable,
    dim: Callable,
    methods: Mapping[str, Callable] | None = None,
    ip_tables: Callable | None = None,
    tables_available: Callable | None = None,
    l2_tables: Callable | None = None,
    inner_product: Callable | None = None,
    sq_norms: Callable | None = None,
    lut_weight: Callable | None = None,
    validate: Callable | None = None,
    scalar_codes: bool = False,
    cos_as_l2: bool = False,
) -> CodebookType:
    """Registers a codebook class: vqlib's encode, decode, fit, save, indexes and LUT weights take it.

    Args:
        cls: a frozen pytree dataclass (`vqlib.codebooks.pytree_dataclass`), so that it can be
            traced, saved and loaded.
        encode, decode, layout, dim: the required functions (see the module docstring).
        methods: method name -> fit(key, x (n, d), **options) returning a `cls`, for `vqlib.fit`.
        ip_tables, tables_available, l2_tables, inner_product, sq_norms, lut_weight, validate:
            optional functions.
        scalar_codes: one code per vector, codes of shape (n,) rather than (n, 1).
        cos_as_l2: indexes rank unit vectors by the L2 estimate (see the module docstring).

    Returns:
        The CodebookType, also found later with `codebook_type(cls)`.

    Example:
        >>> import jax, jax.numpy as jnp, vqlib
        >>> from vqlib.codebooks import CodeLayout, pytree_dataclass, register
        >>> @pytree_dataclass
        ... class DocSign:                   # one bit per coordinate: x ~ scale * (+-1)
        ...     scale: jax.Array             # (d,)
        >>> _ = register(
        ...     DocSign,
        ...     methods={"doc_sign": lambda key, x: DocSign(jnp.mean(jnp.abs(x), axis=0))},
        ...     encode=lambda cb, x: (x > 0).astype(jnp.int32),
        ...     decode=lambda cb, codes: cb.scale[None] * (2.0 * codes.astype(jnp.float32) - 1.0),
        ...     layout=lambda cb: CodeLayout(cb.scale.shape[0], 2),
        ...     dim=lambda cb: cb.scale.shape[0],
        ... )
        >>> cb = vqlib.fit(jnp.array([[-2.0, 1.0], [2.0, -1.0]]), "doc_sign")
        >>> vqlib.decode(cb, vqlib.encode(cb, jnp.array([[3.0, -3.0]]))).tolist()
        [[2.0, -1.0]]
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"cls must be a dataclass type made with vqlib.codebooks.pytree_dataclass, got {cls!r}")
    for name, fn in dict(encode=encode, decode=decode, layout=layout, dim=dim).items():
        if not callable(fn):
            raise TypeError(f"{name} must be a function of the codebook, got {fn!r}")
    methods = dict(methods or {})
    for name in methods:
        owner = _METHODS.get(name)
        if owner is not None and owner[0].cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"method {name!r} is already registered by {owner[0].cls.__name__}; choose another name")
    entry = CodebookType(
        cls, encode, decode, layout, dim, methods, ip_tables, tables_available, l2_tables, inner_product,
        sq_norms, lut_weight, validate, scalar_codes, cos_as_l2,
    )  # fmt: skip
    _TYPES[cls] = entry
    for name, fit_fn in methods.items():
        _METHODS[name] = (entry, fit_fn)
    REGISTERED_TYPES.setdefault(f"{cls.__module__.split('.')[0]}.{cls.__qualname__}", cls)
    VALIDATORS[cls] = validate_codebook
    return entry


def codebook_type(codebook) -> CodebookType:
    """The CodebookType of a codebook (or of a class); TypeError for anything unregistered."""
    cls = codebook if isinstance(codebook, type) else type(codebook)
    entry = _TYPES.get(cls)
    if entry is None:
        known = ", ".join(sorted(c.__name__ for c in _TYPES))
        raise TypeError(f"expected a vqlib codebook ({known}), got {cls.__name__}; register its type with register()")
    return entry


def is_codebook(obj) -> bool:
    return type(obj) in _TYPES


def has_tables(codebook) -> bool:
    """Whether `adc_tables` works for this codebook."""
    t = codebook_type(codebook)
    if t.ip_tables is None:
        return False
    return True if t.tables_available is None else bool(t.tables_available(codebook))


def methods() -> tuple[str, ...]:
    """The method names `vqlib.fit` takes, sorted."""
    return tuple(sorted(_METHODS))


def method_fit(name: str) -> Callable:
    """The fit function of a method name."""
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {list(methods())}")
    return _METHODS[name][1]


def check_options(name: str, options: dict) -> None:
    """TypeError for options the method's fit does not take, or required ones missing."""
    params = inspect.signature(method_fit(name)).parameters
    allowed = sorted(p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY)
    unknown = sorted(set(options) - set(allowed))
    renamed = [f"{old!r} is now {RENAMED_OPTIONS[old]!r}" for old in unknown if RENAMED_OPTIONS.get(old) in allowed]
    if "nbits" in unknown and "k" in allowed:
        renamed.append(f"'nbits' is not an option: pass k={2 ** options['nbits']} codes per codebook (k = 2**nbits)")
    if renamed:
        raise TypeError(f"option {', '.join(renamed)} for method {name!r}; valid options are {allowed}")
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for method {name!r}; valid options are {allowed}")
    missing = [p for p in allowed if params[p].default is inspect.Parameter.empty and p not in options]
    if missing:
        raise TypeError(f"method {name!r} needs option(s) {missing}, e.g. vqlib.fit(x, {name!r}, {missing[0]}=...)")


def fit(x: Float[ArrayLike, "n d"], method: str, *, key=None, **options):
    """Fits a codebook of the given method to `x`.

    Args:
        x: (n, d) training vectors.
        method: a registered method name (`vqlib.codebooks.methods()`): "kmeans", "pq", "opq",
            "rvq", "aq", "e8", "e8p", "turboquant", "turboquant_prod", "qjl", "rabitq".
        key: PRNG key; defaults to `jax.random.key(0)`, so the same call gives the same result.
        **options: the method's options, e.g. k, m, bits, beam, max_iter, sample_weight (see
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
    x = _checks.check_float_array(x, "x", ndim=2, vectors=True)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}; a codebook is fitted to at least one vector of d >= 1")
    return method_fit(method)(jax.random.key(0) if key is None else key, x, **options)


# ----------------------------------------------------------------------------- coding


def _flat_vectors(x, d: int, name: str = "x"):
    """(..., d) -> ((N, d), leading shape)."""
    x = _checks.check_float_array(x, name, vectors=True)
    _checks.check_dim(x, d, name)
    return x.reshape(-1, d), x.shape[:-1]


def encode(codebook, x: Float[ArrayLike, "*b d"]) -> Int[Array, "*b w"]:
    """Vectors (..., d) -> int32 codes (..., w), by the codebook's own encoder (k-means: (...)).

    Example:
        >>> import jax, vqlib
        >>> x = jax.random.normal(jax.random.key(1), (3, 100, 8))         # any leading axes
        >>> vqlib.encode(vqlib.fit(x[0], "pq", m=2, k=16), x).shape
        (3, 100, 2)
    """
    t = codebook_type(codebook)
    flat, lead = _flat_vectors(x, t.dim(codebook))
    width = t.layout(codebook).num_codebooks
    if flat.shape[0] == 0:  # no vectors: no codes (the encoders need not handle it)
        return jnp.zeros(lead if t.scalar_codes else (*lead, width), jnp.int32)
    codes = t.encode(codebook, flat)
    return codes.reshape(lead) if t.scalar_codes else codes.reshape(*lead, width)


def _flat_codes(t: CodebookType, codebook, codes, name: str = "codes"):
    """(..., w) (or (...) for scalar codes) -> ((N, w) or (N,), leading shape), range-checked."""
    out = t.layout(codebook)
    if not hasattr(codes, "dtype"):
        codes = jnp.asarray(codes)
    if t.scalar_codes:
        return _checks.check_codes(codes, out.num_codes, name).reshape(-1), codes.shape
    if codes.ndim < 1 or codes.shape[-1] != out.num_codebooks:
        raise ValueError(
            f"{name} must have shape (..., {out.num_codebooks}) for this codebook (one code per codebook), "
            f"got {tuple(codes.shape)}; were they encoded with another codebook?"
        )
    flat = codes.reshape(-1, out.num_codebooks)
    return _checks.check_codes(flat, out.num_codes, name, width=out.num_codebooks), codes.shape[:-1]


def decode(codebook, codes: Int[ArrayLike, "*b w"]) -> Float[Array, "*b d"]:
    """Codes (..., w) -> reconstructed vectors (..., d) float32."""
    t = codebook_type(codebook)
    flat, lead = _flat_codes(t, codebook, codes)
    if flat.shape[0] == 0:
        return jnp.zeros((*lead, t.dim(codebook)), jnp.float32)
    x_hat = t.decode(codebook, flat)
    return x_hat.reshape(*lead, x_hat.shape[-1])


def code_layout(codebook) -> CodeLayout:
    """Codes per vector, codes per codebook and side bits: `code_layout(cb).bits` is the width
    `vqlib.codebooks.pack_codes` packs at, `.bits_per_vector` the storage of one vector.

    Example:
        >>> import jax, vqlib
        >>> cb = vqlib.fit(jax.random.normal(jax.random.key(1), (500, 8)), "pq", m=4, k=16)
        >>> vqlib.code_layout(cb).bits_per_vector
        16
    """
    return codebook_type(codebook).layout(codebook)


def dim(codebook) -> int:
    """d, the length of the vectors the codebook codes."""
    return codebook_type(codebook).dim(codebook)


# ----------------------------------------------------------------------------- scoring


def _flat_queries(codebook, queries):
    queries = _checks.check_float_array(queries, "queries", ndim=2, vectors=True)
    _checks.check_dim(queries, dim(codebook), "queries")
    return queries.astype(jnp.float32)


def adc_tables(codebook, queries: Float[ArrayLike, "q d"], *, metric: Metric = "l2") -> Float[Array, "q m k"]:
    """Queries (q, d) -> (q, m, k) lookup tables: sum_j tables[i, j, codes[r, j]] + bias[r] scores
    query i against code row r without decoding it (see `vqlib.codebooks.adc_lookup`), where bias
    is `table_bias(codebook, codes)` (None: zero). "l2" gives ||q - x_hat||^2, "ip" <q, x_hat>.

    Example:
        >>> import jax, vqlib
        >>> x = jax.random.normal(jax.random.key(1), (500, 8))
        >>> cb = vqlib.fit(x, "pq", m=4, k=16)
        >>> vqlib.adc_tables(cb, x[:3]).shape
        (3, 4, 16)
    """
    t = codebook_type(codebook)
    if not has_tables(codebook):
        raise NotImplementedError(
            f"{type(codebook).__name__} codes have no lookup tables; use vqlib.inner_product or decode them"
        )
    metric = _checks.check_metric(metric, allowed=("l2", "ip"))
    queries = _flat_queries(codebook, queries)
    return tables_of(t, codebook, queries, metric)


def tables_of(t: CodebookType, codebook, queries, metric: str):
    """`adc_tables` without the checks (for use inside jit)."""
    if metric == "ip":
        return t.ip_tables(codebook, queries)
    if t.l2_tables is not None:
        return t.l2_tables(codebook, queries)
    ip = t.ip_tables(codebook, queries)
    norms = jnp.sum(queries * queries, axis=1)[:, None, None] / ip.shape[1]
    return norms - 2.0 * ip


def table_bias(codebook, codes: Int[ArrayLike, "n ..."], *, metric: Metric = "l2") -> Float[Array, " n"] | None:
    """The per-row term of table lookups (see `adc_tables`): ||x_hat||^2 for "l2" when the
    codebook's L2 tables do not already sum to the distance, else None."""
    t = codebook_type(codebook)
    metric = _checks.check_metric(metric, allowed=("l2", "ip"))
    if metric == "ip" or t.l2_tables is not None:
        return None
    flat, _ = _flat_codes(t, codebook, codes)
    return sq_norms_of(t, codebook, flat)


def inner_product(codebook, codes: Int[ArrayLike, "n ..."], queries: Float[ArrayLike, "q d"]) -> Float[Array, "q n"]:
    """Estimates <queries[i], x_j> for every query and every encoded x_j: (q, n) float32.

    TurboQuant-prod, QJL and RaBitQ codes give unbiased estimates from the codes without
    decoding (a rotation or projection of the queries, then a product with the codes);
    TurboQuant-mse gives <q, x~>, which shrinks <q, x> by 1 - D_mse on average. Other codebooks
    are decoded and multiplied.

    Args:
        codebook: a fitted vqlib codebook.
        codes: its codes of n vectors, as `vqlib.encode` returns them.
        queries: (q, d) float vectors, not quantized.

    Example:
        >>> import jax, jax.numpy as jnp, vqlib
        >>> x = jax.random.normal(jax.random.key(1), (200, 32))
        >>> cb = vqlib.fit(x, "turboquant_prod", bits=4)
        >>> est = vqlib.inner_product(cb, vqlib.encode(cb, x), x[:3])
        >>> est.shape, bool(jnp.corrcoef(est.ravel(), (x[:3] @ x.T).ravel())[0, 1] > 0.95)
        ((3, 200), True)
    """
    t = codebook_type(codebook)
    flat, _ = _flat_codes(t, codebook, codes)
    queries = _flat_queries(codebook, queries)
    if flat.shape[0] == 0 or queries.shape[0] == 0:
        return jnp.zeros((queries.shape[0], flat.shape[0]), jnp.float32)
    return inner_product_of(t, codebook, flat, queries)


def inner_product_of(t: CodebookType, codebook, codes, queries):
    """`inner_product` without the checks (for use inside jit)."""
    if t.inner_product is not None:
        return t.inner_product(codebook, codes, queries)
    x_hat = t.decode(codebook, codes)
    return jnp.matmul(queries.astype(jnp.float32), x_hat.T, precision=_HIGHEST)


def sq_norms(codebook, codes: Int[ArrayLike, "n ..."]) -> Float[Array, " n"]:
    """(n,) ||x||^2 as the codes know it: ||decode(codes)||^2, or a stored norm (TurboQuant, QJL),
    or an estimate consistent with `inner_product` (RaBitQ), so that
    ||q||^2 - 2 inner_product + sq_norms estimates ||q - x||^2."""
    t = codebook_type(codebook)
    flat, _ = _flat_codes(t, codebook, codes)
    if flat.shape[0] == 0:
        return jnp.zeros((0,), jnp.float32)
    return sq_norms_of(t, codebook, flat)


def sq_norms_of(t: CodebookType, codebook, codes):
    """`sq_norms` without the checks (for use inside jit)."""
    if t.sq_norms is not None:
        return t.sq_norms(codebook, codes)
    x_hat = t.decode(codebook, codes)
    return jnp.sum(x_hat * x_hat, axis=1)


# ----------------------------------------------------------------------------- weights and files


def to_lut_weight(codebook, codes: Int[ArrayLike, "n ..."], shape: tuple[int, int]) -> LUTWeight:
    """A `vqlib.kernels.LUTWeight` for the (out, in) weight W whose rows (or chunks of rows, when
    the codebook codes vectors of a length dividing `in`) the codes encode, row-major.

    Example:
        >>> import jax, jax.numpy as jnp, vqlib
        >>> w = jax.random.normal(jax.random.key(0), (16, 32))
        >>> cb = vqlib.fit(w.reshape(-1, 4), "kmeans", k=16)              # VQ on groups of 4
        >>> lut = vqlib.codebooks.to_lut_weight(cb, vqlib.encode(cb, w.reshape(-1, 4)), w.shape)
        >>> x = jnp.ones((2, 32))
        >>> bool(jnp.allclose(vqlib.kernels.lut_matmul(x, lut), x @ vqlib.kernels.dequantize(lut).T, atol=1e-4))
        True
    """
    t = codebook_type(codebook)
    if t.lut_weight is None:
        raise NotImplementedError(f"{type(codebook).__name__} has no LUTWeight form; decode the weight instead")
    out, cols = (_checks.check_int(s, "shape", low=1) for s in shape)
    d = t.dim(codebook)
    if cols % d:
        raise ValueError(f"shape={shape}: in={cols} must be a multiple of the codebook's d={d}")
    flat, _ = _flat_codes(t, codebook, codes)
    if flat.shape[0] != out * cols // d:
        raise ValueError(
            f"codes hold {flat.shape[0]} vectors but a {shape} weight in vectors of {d} needs {out * cols // d}"
        )
    return t.lut_weight(codebook, flat, (out, cols))


def validate_codebook(codebook, where: str = "codebook") -> None:
    """Checks a codebook's invariants (what `vqlib.load` runs on every codebook it rebuilds):
    finite float leaves (fit statistics aside: NaN marks their unused entries), then the type's
    own `validate`. ValueError names the field."""
    t = codebook_type(codebook)
    for path, leaf in jax.tree_util.tree_leaves_with_path(codebook):
        name = f"{where}{jax.tree_util.keystr(path)}"
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating) and ".stats" not in name:
            _checks.check_finite(leaf, name)
    if t.validate is not None:
        t.validate(codebook)


class Quantizer(NamedTuple):
    """A fit with its options bound, in the optax manner: `fit(key, x)` -> codebook.

    `vqlib.quantizer(method, **options)` makes one; `vqlib.residual` and `vqlib.dim_weighted`
    map Quantizers to a Quantizer. Encoding and decoding go by the codebook's registered type.
    """

    fit: Callable[[Any, jax.Array], Any]


def quantizer(method: str, **options) -> Quantizer:
    """The method's fit with `options` bound: `.fit(key, x)` takes no further options.

    Example:
        >>> import jax, vqlib
        >>> q = vqlib.quantizer("pq", m=2, k=8)
        >>> q.fit(jax.random.key(0), jax.random.normal(jax.random.key(1), (100, 4))).centroids.shape
        (2, 8, 2)
    """
    fit_fn = method_fit(method)
    check_options(method, options)

    def bound(key, x):
        return fit_fn(key, x, **options)

    return Quantizer(bound)
