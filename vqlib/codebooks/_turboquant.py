"""TurboQuant (MSE and inner-product variants) and the QJL sign sketch: data-oblivious quantizers.

TurboQuant-mse codes the unit vector u = x / ||x|| at b bits per coordinate: y = Pi u for a
random rotation Pi, then each y_j by the nearest of 2**b centroids, the Lloyd-Max quantizer of
the law of one coordinate of a uniform unit vector in R^d, f(t) ~ (1 - t^2)^((d - 3) / 2) on
[-1, 1] (variance 1/d, close to N(0, 1/d) for large d). Decoding is x ~ ||x|| Pi^T c[idx].
Because Pi is random, E||u - u~||^2 equals the scalar quantizer's distortion for every u:
D_mse = 0.3634, 0.1175, 0.0345, 0.0095 at b = 1..4 for large d (Max 1960).

QJL stores sign(S x) for S (m, d) with i.i.d. N(0, 1) entries, plus ||x||; the estimate
<q, x> ~ sqrt(pi / 2) / m * ||x|| * <S q, sign(S x)> is unbiased with variance
((pi / 2) ||q||^2 ||x||^2 - <q, x>^2) / m. TurboQuant-prod spends b - 1 bits on
TurboQuant-mse and one bit per coordinate on QJL (m = d) of the residual r = u - u~_mse, with
gamma = ||r|| stored: unbiased inner products, variance at most (pi / 2) D_mse(b - 1) ||q||^2 / d.

The Lloyd-Max codebooks are computed once per (d, bits), in float64, by Lloyd iteration on the
exact density (Gauss-Legendre quadrature in t = sin(theta), where it reads cos(theta)^(d - 2)),
and cached in memory; no table is stored in the code.

Codes. Per vector, one int32 column per coordinate (mse: idx in [0, 2**b); prod: 2 idx + sign;
QJL: the m signs), followed by the side data: the float norm(s) (||x||; prod also gamma) in
`norm_dtype` ("float16": 16 bits each, the paper's accounting; "float32": 32), bit-cast and cut
into b-bit columns, ceil(16 f / b) of them for f floats. Every column is a b-bit value, so
`pack_codes(codes, code_layout(cb).bits)` stores them and `code_layout(cb).bits_per_vector`
counts the norms. float16 norms must lie in [6.1e-5, 65504] (or be 0); use "float32" otherwise.

References:
    Zandieh, Daliri, Hadian & Mirrokni, "TurboQuant: online vector quantization with
    near-optimal distortion rate", arXiv 2504.19874, 2025.
    Zandieh, Daliri & Han, "QJL: 1-bit quantized JL transform for KV cache quantization with
    zero overhead", arXiv 2406.03482, 2024.
    Max, "Quantizing for minimum distortion", IRE Trans. Information Theory, 1960.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vqlib import _checks
from vqlib._types import CodeLayout, pytree_dataclass, static_field
from vqlib.codebooks._hadamard import Rotation, random_rotation, rotate, unrotate

MAX_BITS = 6  # Lloyd iteration needs ~4x more steps per extra bit (b = 6: about 2 s, once per d)
NORM_DTYPES = ("float16", "float32")
_QUADRATURE = np.polynomial.legendre.leggauss(256)
_SQRT_HALF_PI = math.sqrt(math.pi / 2)
_HIGHEST = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- Lloyd-Max codebooks


def _cells(d: int, bounds: np.ndarray):
    """Quadrature of f on the cells [bounds[i], bounds[i+1]]: (cells, nodes) weights and nodes t.

    With t = sin(theta), f(t) dt = cos(theta)^(d-2) dtheta, smooth on [-pi/2, pi/2]; theta is
    clipped to 40 standard deviations (f is below 1e-300 of its peak beyond)."""
    limit = min(math.pi / 2, 40 / math.sqrt(d))
    theta = np.clip(np.arcsin(np.clip(bounds, -1.0, 1.0)), -limit, limit)
    nodes, weights = _QUADRATURE
    half = (theta[1:] - theta[:-1])[:, None] / 2
    mid = (theta[1:] + theta[:-1])[:, None] / 2 + half * nodes
    return half * weights * np.exp((d - 2) * np.log(np.cos(mid))), np.sin(mid)


def _bounds(centroids: np.ndarray) -> np.ndarray:
    return np.concatenate([[-1.0], (centroids[1:] + centroids[:-1]) / 2, [1.0]])


@functools.cache
def _lloyd_max(d: int, bits: int) -> tuple[np.ndarray, float]:
    levels = 2**bits
    spread = min(1.0, 3 / math.sqrt(d))
    centroids = np.linspace(-spread, spread, 2 * levels + 1)[1::2]  # midpoints of equal cells
    for _ in range(100_000):
        w, t = _cells(d, _bounds(centroids))
        new = np.sum(w * t, axis=1) / np.sum(w, axis=1)
        new = (new - new[::-1]) / 2  # the law is symmetric; keep the codebook exactly so
        done = np.max(np.abs(new - centroids)) * math.sqrt(d) < 1e-10
        centroids = new
        if done:
            break
    w, t = _cells(d, _bounds(centroids))
    distortion = d * np.sum(w * (t - centroids[:, None]) ** 2) / np.sum(w)
    return centroids, float(distortion)


def lloyd_max_codebook(d: int, bits: int) -> tuple[np.ndarray, float]:
    """The Lloyd-Max quantizer of one coordinate of a uniform unit vector in R^d, in float64.

    Args:
        d: dimension, >= 2.
        bits: 0 to MAX_BITS; 2**bits levels (0 bits: the single centroid 0).

    Returns:
        (centroids (2**bits,) sorted float64, D) where D = d * E(y - c(y))^2 is the expected
        squared error ||u - u~||^2 of TurboQuant-mse on unit vectors u.

    Example:
        >>> from vqlib.codebooks import lloyd_max_codebook
        >>> c, dist = lloyd_max_codebook(128, 2)
        >>> round(dist, 4), round(float(c[-1]) * 128**0.5, 3)
        (0.116, 1.505)
    """
    d = _checks.check_int(d, "d", low=2)
    bits = _checks.check_int(bits, "bits", low=0, high=MAX_BITS)
    centroids, distortion = _lloyd_max(d, bits)
    return centroids.copy(), distortion


# ----------------------------------------------------------------------------- codebooks


@pytree_dataclass
class TurboQuantCodebook:
    """TurboQuant-mse: rotation, then one scalar Lloyd-Max quantizer for every coordinate.

    Attributes:
        rotation: the random rotation Pi of R^d.
        centroids: (2**b,) float32 Lloyd-Max levels for coordinates of unit vectors in R^d.
        norm_dtype: how ||x|| is stored: "float16" or "float32".
    """

    rotation: Rotation
    centroids: jax.Array
    norm_dtype: str = static_field("float16")


@pytree_dataclass
class QJLCodebook:
    """QJL: signs of m Gaussian projections plus ||x||.

    Attributes:
        projection: (m, d) float32 with i.i.d. N(0, 1) entries.
        norm_dtype: how ||x|| is stored: "float16" or "float32".
    """

    projection: jax.Array
    norm_dtype: str = static_field("float16")


@pytree_dataclass
class TurboQuantProdCodebook:
    """TurboQuant-prod: (b - 1)-bit TurboQuant-mse, then QJL (m = d) on the residual.

    Attributes:
        mse: the (b - 1)-bit stage (one centroid, 0, when b = 1: pure QJL).
        qjl: the sketch of the residual, projection (d, d).
    """

    mse: TurboQuantCodebook
    qjl: QJLCodebook


Codebook = TurboQuantCodebook | QJLCodebook | TurboQuantProdCodebook


def _parts(cb: Codebook) -> tuple[TurboQuantCodebook | None, jax.Array | None]:
    """(scalar stage, QJL projection): each None where the method has no such stage."""
    if isinstance(cb, TurboQuantProdCodebook):
        return cb.mse, cb.qjl.projection
    if isinstance(cb, QJLCodebook):
        return None, cb.projection
    return cb, None


def _norm_dtype(cb: Codebook) -> str:
    return cb.mse.norm_dtype if isinstance(cb, TurboQuantProdCodebook) else cb.norm_dtype


def _dim(cb: Codebook) -> int:
    mse, projection = _parts(cb)
    return projection.shape[1] if mse is None else mse.rotation.signs.shape[0]


def _shape(cb: Codebook) -> tuple[int, int, int]:
    """(code columns before the side data, bits per column, side floats per vector)."""
    mse, projection = _parts(cb)
    if mse is None:
        return projection.shape[0], 1, 1
    level_bits = (mse.centroids.shape[0] - 1).bit_length()
    if projection is None:
        return _dim(cb), level_bits, 1
    return _dim(cb), level_bits + 1, 2  # prod: level and sign in one column; ||x|| and gamma


def _float_bits(norm_dtype: str) -> int:
    return 16 if norm_dtype == "float16" else 32


def layout(cb: Codebook) -> CodeLayout:
    """d (QJL: m) columns of quantization codes, then the norms cut into columns of the same width."""
    width, bits, floats = _shape(cb)
    return CodeLayout(width + -(-floats * _float_bits(_norm_dtype(cb)) // bits), 2**bits)


# ----------------------------------------------------------------------------- side data as code columns


def _unsigned(norm_dtype: str):
    return jnp.uint16 if norm_dtype == "float16" else jnp.uint32


def _positions(shape: tuple[int, ...], bits: int):
    """(*shape, bits) uint32 bit positions 0..bits-1 along the last axis."""
    return lax.broadcasted_iota(jnp.uint32, (*shape, bits), len(shape))


def _floats_to_columns(values, norm_dtype: str, bits: int):
    """(n, f) float32 -> (n, ceil(f w / bits)) int32 columns of `bits` bits holding the w-bit floats."""
    width = _float_bits(norm_dtype)
    words = lax.bitcast_convert_type(values.astype(norm_dtype), _unsigned(norm_dtype)).astype(jnp.uint32)
    stream = ((words[..., None] >> _positions(words.shape, width)) & 1).reshape(values.shape[0], -1)
    num_columns = -(-stream.shape[1] // bits)
    stream = jnp.pad(stream, ((0, 0), (0, num_columns * bits - stream.shape[1])))
    stream = stream.reshape(values.shape[0], num_columns, bits)
    return jnp.sum(stream << _positions(stream.shape[:-1], bits), axis=-1).astype(jnp.int32)


def _columns_to_floats(columns, num_floats: int, norm_dtype: str, bits: int):
    """Inverse of `_floats_to_columns`: (n, c) int32 -> (n, num_floats) float32."""
    width = _float_bits(norm_dtype)
    stream = (columns.astype(jnp.uint32)[..., None] >> _positions(columns.shape, bits)) & 1
    stream = stream.reshape(columns.shape[0], -1)[:, : num_floats * width].reshape(-1, num_floats, width)
    words = jnp.sum(stream << _positions(stream.shape[:-1], width), axis=-1)
    return lax.bitcast_convert_type(words.astype(_unsigned(norm_dtype)), norm_dtype).astype(jnp.float32)


# ----------------------------------------------------------------------------- coding unit vectors


def _levels(mse: TurboQuantCodebook, idx):
    """(n, d) level indices -> (n, d) levels, the rotated reconstruction Pi u~."""
    return jnp.take(mse.centroids, idx, axis=0)


def _encode_unit(cb: Codebook, u):
    """Unit vectors (n, d) -> (code columns (n, width), gamma (n, 1) or (n, 0))."""
    mse, projection = _parts(cb)
    residual, idx = u, None
    if mse is not None:
        c = mse.centroids
        idx = jnp.searchsorted((c[1:] + c[:-1]) / 2, rotate(mse.rotation, u)).astype(jnp.int32)
        residual = u - unrotate(mse.rotation, _levels(mse, idx))
        if projection is None:
            return idx, u[:, :0]
    signs = (jnp.matmul(residual, projection.T, precision=_HIGHEST) >= 0).astype(jnp.int32)
    if mse is None:
        return signs, u[:, :0]
    return 2 * idx + signs, jnp.linalg.norm(residual, axis=-1, keepdims=True)


def _split_codes(cb: Codebook, codes):
    """codes -> (level indices or None, signs as +-1 float32 or None, ||x|| (n,), gamma (n,))."""
    width, bits, floats = _shape(cb)
    values = _columns_to_floats(codes[:, width:], floats, _norm_dtype(cb), bits)
    body = codes[:, :width]
    mse, projection = _parts(cb)
    if projection is None:
        return body, None, values[:, 0], None
    idx, signs = (None, body) if mse is None else (body >> 1, body & 1)
    gamma = values[:, 1] if mse is not None else jnp.ones_like(values[:, 0])
    return idx, (2 * signs - 1).astype(jnp.float32), values[:, 0], gamma


@jax.jit
def _encode(cb: Codebook, x):
    x = x.astype(jnp.float32)
    norms = jnp.linalg.norm(x, axis=-1, keepdims=True)
    body, gamma = _encode_unit(cb, x / jnp.where(norms > 0, norms, 1.0))
    bits = _shape(cb)[1]
    return jnp.concatenate([body, _floats_to_columns(jnp.concatenate([norms, gamma], 1), _norm_dtype(cb), bits)], 1)


@jax.jit
def _decode(cb: Codebook, codes):
    mse, projection = _parts(cb)
    idx, signs, norms, gamma = _split_codes(cb, codes)
    u = 0.0
    if mse is not None:
        u = unrotate(mse.rotation, _levels(mse, idx))
    if projection is not None:
        weight = _SQRT_HALF_PI / projection.shape[0] * gamma
        u = u + weight[:, None] * jnp.matmul(signs, projection, precision=_HIGHEST)
    return norms[:, None] * u


@jax.jit
def _inner(cb: Codebook, codes, queries):
    """(q, d) queries -> (q, n) estimates of <query, x> without decoding x."""
    mse, projection = _parts(cb)
    idx, signs, norms, gamma = _split_codes(cb, codes)
    queries = queries.astype(jnp.float32)
    out = 0.0
    if mse is not None:
        out = jnp.matmul(rotate(mse.rotation, queries), _levels(mse, idx).T, precision=_HIGHEST)
    if projection is not None:
        sketched = jnp.matmul(queries, projection.T, precision=_HIGHEST)  # (q, m)
        weight = _SQRT_HALF_PI / projection.shape[0] * gamma
        out = out + jnp.matmul(sketched, signs.T, precision=_HIGHEST) * weight[None, :]
    return out * norms[None, :]


# ----------------------------------------------------------------------------- fitting


def _check_fit(x, bits, norm_dtype, *, low: int, high: int) -> tuple[int, int]:
    x = _checks.check_float_array(x, "x", ndim=2)
    if x.shape[1] < 2:
        raise ValueError(f"x must have dimension d >= 2 for a random rotation, got d={x.shape[1]}")
    bits = _checks.check_int(bits, "bits", low=low, high=high)
    if norm_dtype not in NORM_DTYPES:
        raise ValueError(f"norm_dtype must be one of {NORM_DTYPES}, got {norm_dtype!r}")
    return x.shape[1], bits


def _fit_keys(key):
    """Two keys derived from `key`, never `key` itself: data drawn from the same key (often key(0),
    vqlib.fit's default) would otherwise share its first rows with the rotation or projection."""
    return jax.random.split(key)


def _scalar_stage(key, d: int, bits: int, rotation: str, norm_dtype: str) -> TurboQuantCodebook:
    centroids = jnp.asarray(_lloyd_max(d, bits)[0], jnp.float32)
    return TurboQuantCodebook(random_rotation(key, d, kind=rotation), centroids, norm_dtype)


def fit_turboquant(key, x, *, bits: int = 4, rotation: str = "dense", norm_dtype: str = "float16"):
    """TurboQuant-mse at `bits` bits per coordinate: draws the rotation; x gives only d.

    Args:
        key: PRNG key of the rotation.
        x: (n, d) vectors (only d is used; checked for finite values), d >= 2.
        bits: 1 to MAX_BITS (6) bits per coordinate.
        rotation: "dense" (a Haar d x d matrix: the paper's Pi, exact for every x) or
            "hadamard" (random signs + fast Walsh-Hadamard, O(d log d); the same law for
            random inputs but no per-vector guarantee).
        norm_dtype: "float16" (16 bits per vector, as in the paper) or "float32".

    Returns:
        TurboQuantCodebook; codes are (n, d + ceil(16 / bits)) for float16 norms.

    Example:
        >>> import jax, vqlib
        >>> x = jax.random.normal(jax.random.key(1), (1000, 64))
        >>> cb = vqlib.fit(x, "turboquant", bits=4)
        >>> codes = vqlib.encode(cb, x)
        >>> codes.shape, vqlib.code_layout(cb).bits_per_vector     # 64 * 4 bits + a float16 norm
        ((1000, 68), 272)
    """
    d, bits = _check_fit(x, bits, norm_dtype, low=1, high=MAX_BITS)
    return _scalar_stage(_fit_keys(key)[0], d, bits, rotation, norm_dtype)


def fit_turboquant_prod(key, x, *, bits: int = 4, rotation: str = "dense", norm_dtype: str = "float16"):
    """TurboQuant-prod at `bits` bits per coordinate: (bits - 1)-bit TurboQuant-mse plus 1-bit QJL.

    Args:
        key: PRNG key of the rotation and the (d, d) Gaussian projection.
        x: (n, d) vectors (only d is used), d >= 2.
        bits: 1 to MAX_BITS (6); bits = 1 is QJL with m = d.
        rotation, norm_dtype: as for `fit_turboquant`; two floats (||x||, gamma) per vector.

    Returns:
        TurboQuantProdCodebook; `inner_product` gives unbiased estimates of <q, x>.

    Example:
        >>> import jax, vqlib
        >>> x = jax.random.normal(jax.random.key(1), (1000, 64))
        >>> cb = vqlib.fit(x, "turboquant_prod", bits=3)
        >>> vqlib.inner_product(cb, vqlib.encode(cb, x), x[:5]).shape
        (5, 1000)
    """
    d, bits = _check_fit(x, bits, norm_dtype, low=1, high=MAX_BITS)
    mse_key, qjl_key = _fit_keys(key)
    projection = jax.random.normal(qjl_key, (d, d), jnp.float32)
    return TurboQuantProdCodebook(
        _scalar_stage(mse_key, d, bits - 1, rotation, norm_dtype), QJLCodebook(projection, norm_dtype)
    )


def fit_qjl(key, x, *, bits: int = 1, norm_dtype: str = "float16") -> QJLCodebook:
    """QJL with m = bits * d Gaussian projections (one sign bit each) plus the stored ||x||.

    Args:
        key: PRNG key of the projection.
        x: (n, d) vectors (only d is used), d >= 2.
        bits: sketch bits per dimension, 1 to 16 (the authors use m = 256 for d = 128: bits = 2).
        norm_dtype: "float16" or "float32".

    Returns:
        QJLCodebook with projection (bits * d, d).

    Example:
        >>> import jax, vqlib
        >>> x = jax.random.normal(jax.random.key(1), (100, 32))
        >>> cb = vqlib.fit(x, "qjl", bits=2)
        >>> vqlib.encode(cb, x).shape                # 64 signs + a float16 norm as 16 one-bit columns
        (100, 80)
    """
    d, bits = _check_fit(x, bits, norm_dtype, low=1, high=16)
    return QJLCodebook(jax.random.normal(_fit_keys(key)[1], (bits * d, d), jnp.float32), norm_dtype)


# ----------------------------------------------------------------------------- public coding


def _check_norms(x, norm_dtype: str) -> None:
    """float16 norms: every nonzero ||x|| must be a normal float16 (relative error 2**-11)."""
    if norm_dtype != "float16" or not _checks.is_concrete(x) or x.shape[0] == 0:
        return
    norms = jnp.linalg.norm(x.astype(jnp.float32), axis=-1)
    info = jnp.finfo(jnp.float16)
    low, high = float(info.smallest_normal), float(info.max)
    largest = float(jnp.max(norms))
    smallest = float(jnp.min(jnp.where(norms > 0, norms, high)))
    if largest > high or smallest < low:
        raise ValueError(
            f"x has vector norms in [{smallest:.3g}, {largest:.3g}], outside the float16 range "
            f"[{low:.3g}, {high:.5g}]; fit with norm_dtype='float32' or rescale x"
        )


def encode(cb: Codebook, x) -> jax.Array:
    """(n, d) vectors -> int32 codes: quantization codes, then the stored norms (see `layout`)."""
    x = _checks.check_float_array(x, "x", ndim=2)
    _checks.check_dim(x, _dim(cb))
    _check_norms(x, _norm_dtype(cb))
    return _encode(cb, x)


def decode(cb: Codebook, codes) -> jax.Array:
    """Codes -> (n, d) float32 reconstructions ||x|| u~ (unbiased in every direction for QJL and prod)."""
    out = layout(cb)
    return _decode(cb, _checks.check_codes(codes, out.num_codes, width=out.num_codebooks))


def inner_product(codebook, codes, queries) -> jax.Array:
    """Estimates <queries[i], x_j> for every query and every encoded x_j: (q, n) float32.

    TurboQuant-prod and QJL codes give unbiased estimates, computed from the codes without
    decoding (one (q, d) rotation or projection of the queries, then a product with the codes);
    TurboQuant-mse gives <q, x~>, which shrinks <q, x> by 1 - D_mse on average. Any other vqlib
    codebook is decoded and multiplied.

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
    if not isinstance(codebook, Codebook):
        from vqlib import _fit  # the front door imports this module

        x_hat = _fit.decode(codebook, codes)
        queries = _checks.check_float_array(queries, "queries", ndim=2)
        _checks.check_dim(queries, x_hat.shape[-1], "queries")
        return jnp.matmul(queries.astype(jnp.float32), x_hat.T, precision=_HIGHEST)
    queries = _checks.check_float_array(queries, "queries", ndim=2)
    _checks.check_dim(queries, _dim(codebook), "queries")
    out = layout(codebook)
    return _inner(codebook, _checks.check_codes(codes, out.num_codes, width=out.num_codebooks), queries)
