"""TurboQuant, the MSE and the inner-product variants: data-oblivious quantizers.

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

The Lloyd-Max codebooks come from `vqlib.codebooks.lloyd_max_codebook` (float64, exact law);
the QJL sketch from the QJL codebook's module.

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

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Int

from vqlib._types import CodeLayout, pytree_dataclass, static_field
from vqlib.codebooks import _protocol
from vqlib.codebooks._hadamard import Rotation, random_rotation, rotate, unrotate
from vqlib.codebooks._lloyd_max import MAX_BITS, lloyd_max
from vqlib.codebooks._qjl import (
    QJLCodebook,
    check_fit,
    check_norms,
    sketch_decode,
    sketch_inner,
    sketch_signs,
    unit_rows,
)
from vqlib.codebooks._side import FLOAT_DTYPES, columns_to_floats, floats_to_columns, side_columns
from vqlib.kernels import nearest_level

_HIGHEST = lax.Precision.HIGHEST


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
class TurboQuantProdCodebook:
    """TurboQuant-prod: (b - 1)-bit TurboQuant-mse, then QJL (m = d) on the residual.

    Attributes:
        mse: the (b - 1)-bit stage (one centroid, 0, when b = 1: pure QJL).
        qjl: the sketch of the residual, projection (d, d).
    """

    mse: TurboQuantCodebook
    qjl: QJLCodebook


# ----------------------------------------------------------------------------- fitting


def _scalar_stage(key, d: int, bits: int, rotation: str, norm_dtype: str) -> TurboQuantCodebook:
    centroids = jnp.asarray(lloyd_max(d, bits)[0], jnp.float32)
    return TurboQuantCodebook(random_rotation(key, d, kind=rotation), centroids, norm_dtype)


def fit_turboquant(
    key, x: Float[ArrayLike, "n d"], *, bits: int = 4, rotation: str = "dense", norm_dtype: str = "float16"
):
    """TurboQuant-mse at `bits` bits per coordinate: draws the rotation; x gives only d.

    Args:
        key: PRNG key of the rotation (a key derived from it, never `key` itself: data drawn
            from the same key would share its first rows with the rotation).
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
    d, bits = check_fit(x, bits, norm_dtype, low=1, high=MAX_BITS)
    return _scalar_stage(jax.random.split(key)[0], d, bits, rotation, norm_dtype)


def fit_turboquant_prod(
    key, x: Float[ArrayLike, "n d"], *, bits: int = 4, rotation: str = "dense", norm_dtype: str = "float16"
):
    """TurboQuant-prod at `bits` bits per coordinate: (bits - 1)-bit TurboQuant-mse plus 1-bit QJL.

    Args:
        key: PRNG key of the rotation and the (d, d) Gaussian projection.
        x: (n, d) vectors (only d is used), d >= 2.
        bits: 1 to MAX_BITS (6); bits = 1 is QJL with m = d.
        rotation, norm_dtype: as for `fit_turboquant`; two floats (||x||, gamma) per vector.

    Returns:
        TurboQuantProdCodebook; `vqlib.inner_product` gives unbiased estimates of <q, x>.

    Example:
        >>> import jax, vqlib
        >>> x = jax.random.normal(jax.random.key(1), (1000, 64))
        >>> cb = vqlib.fit(x, "turboquant_prod", bits=3)
        >>> vqlib.inner_product(cb, vqlib.encode(cb, x), x[:5]).shape
        (5, 1000)
    """
    d, bits = check_fit(x, bits, norm_dtype, low=1, high=MAX_BITS)
    mse_key, qjl_key = jax.random.split(key)
    projection = jax.random.normal(qjl_key, (d, d), jnp.float32)
    return TurboQuantProdCodebook(
        _scalar_stage(mse_key, d, bits - 1, rotation, norm_dtype), QJLCodebook(projection, norm_dtype)
    )


# ----------------------------------------------------------------------------- TurboQuant-mse


def _level_bits(cb: TurboQuantCodebook) -> int:
    return (cb.centroids.shape[0] - 1).bit_length()


def _dim(cb: TurboQuantCodebook) -> int:
    return cb.rotation.signs.shape[0]


def _quantize(cb: TurboQuantCodebook, u):
    """Unit vectors (n, d) -> (n, d) level indices of the rotated coordinates."""
    return nearest_level(rotate(cb.rotation, u), cb.centroids)


def _dequantize(cb: TurboQuantCodebook, idx):
    """(n, d) level indices -> (n, d) unit-vector reconstructions Pi^T c[idx]."""
    return unrotate(cb.rotation, jnp.take(cb.centroids, idx, axis=0))


def layout(cb: TurboQuantCodebook) -> CodeLayout:
    """d columns of level indices, then ||x|| cut into columns of the same width."""
    bits = _level_bits(cb)
    return CodeLayout(_dim(cb) + side_columns(1, cb.norm_dtype, bits), 2**bits)


def _split(cb: TurboQuantCodebook, codes):
    """codes -> (level indices (n, d), ||x|| (n,))."""
    d = _dim(cb)
    return codes[:, :d], columns_to_floats(codes[:, d:], 1, cb.norm_dtype, _level_bits(cb))[:, 0]


@jax.jit
def _encode(cb: TurboQuantCodebook, x):
    u, norms = unit_rows(x)
    return jnp.concatenate([_quantize(cb, u), floats_to_columns(norms, cb.norm_dtype, _level_bits(cb))], 1)


def encode(cb: TurboQuantCodebook, x: Float[Array, "n d"]) -> Int[Array, "n w"]:
    """(n, d) -> d level indices, then the stored norm (see `layout`)."""
    check_norms(x, cb.norm_dtype)
    return _encode(cb, x)


@jax.jit
def decode(cb: TurboQuantCodebook, codes: Int[Array, "n w"]) -> Float[Array, "n d"]:
    """||x|| Pi^T c[idx]."""
    idx, norms = _split(cb, codes)
    return norms[:, None] * _dequantize(cb, idx)


@jax.jit
def inner_product(cb: TurboQuantCodebook, codes, queries):
    """<q, x~> = ||x|| <Pi q, c[idx]>: one rotation of the queries, no decoding."""
    idx, norms = _split(cb, codes)
    levels = jnp.take(cb.centroids, idx, axis=0)
    return jnp.matmul(rotate(cb.rotation, queries), levels.T, precision=_HIGHEST) * norms[None, :]


@jax.jit
def sq_norms(cb: TurboQuantCodebook, codes):
    """The stored ||x||^2 (not ||x~||^2, which the quantization shrinks)."""
    norms = _split(cb, codes)[1]
    return norms * norms


def validate(cb: TurboQuantCodebook) -> None:
    levels = cb.centroids.shape
    if len(levels) != 1 or levels[0] < 1 or levels[0] & (levels[0] - 1):
        raise ValueError(f"centroids must be (2**bits,), got shape {levels}")
    if cb.rotation.signs.ndim != 1 or _dim(cb) < 2:
        raise ValueError(f"the rotation must act on d >= 2, got signs of shape {cb.rotation.signs.shape}")
    if not bool(jnp.all(jnp.diff(cb.centroids) > 0)):
        raise ValueError("centroids must be sorted ascending and distinct")
    if cb.norm_dtype not in FLOAT_DTYPES:
        raise ValueError(f"norm_dtype must be one of {FLOAT_DTYPES}, got {cb.norm_dtype!r}")


_protocol.register(
    TurboQuantCodebook,
    methods={"turboquant": fit_turboquant},
    encode=encode,
    decode=decode,
    layout=layout,
    dim=_dim,
    inner_product=inner_product,
    sq_norms=sq_norms,
    validate=validate,
)


# ----------------------------------------------------------------------------- TurboQuant-prod


def _prod_bits(cb: TurboQuantProdCodebook) -> int:
    return _level_bits(cb.mse) + 1  # level and sign in one column


def prod_layout(cb: TurboQuantProdCodebook) -> CodeLayout:
    """d columns of (level, sign), then ||x|| and gamma cut into columns of the same width."""
    bits = _prod_bits(cb)
    return CodeLayout(_dim(cb.mse) + side_columns(2, cb.mse.norm_dtype, bits), 2**bits)


def _prod_split(cb: TurboQuantProdCodebook, codes):
    """codes -> (level indices (n, d), signs (n, d) in {0, 1}, ||x|| (n,), gamma (n,))."""
    d = _dim(cb.mse)
    floats = columns_to_floats(codes[:, d:], 2, cb.mse.norm_dtype, _prod_bits(cb))
    body = codes[:, :d]
    return body >> 1, body & 1, floats[:, 0], floats[:, 1]


@jax.jit
def _prod_encode(cb: TurboQuantProdCodebook, x):
    u, norms = unit_rows(x)
    idx = _quantize(cb.mse, u)
    residual = u - _dequantize(cb.mse, idx)
    gamma = jnp.linalg.norm(residual, axis=-1, keepdims=True)
    body = 2 * idx + sketch_signs(cb.qjl.projection, residual)
    side = floats_to_columns(jnp.concatenate([norms, gamma], 1), cb.mse.norm_dtype, _prod_bits(cb))
    return jnp.concatenate([body, side], 1)


def prod_encode(cb: TurboQuantProdCodebook, x: Float[Array, "n d"]) -> Int[Array, "n w"]:
    check_norms(x, cb.mse.norm_dtype)
    return _prod_encode(cb, x)


@jax.jit
def prod_decode(cb: TurboQuantProdCodebook, codes: Int[Array, "n w"]) -> Float[Array, "n d"]:
    """||x|| (Pi^T c[idx] + gamma sqrt(pi / 2) / d S^T signs): unbiased in every direction."""
    idx, signs, norms, gamma = _prod_split(cb, codes)
    u = _dequantize(cb.mse, idx) + sketch_decode(cb.qjl.projection, signs, gamma)
    return norms[:, None] * u


@jax.jit
def prod_inner_product(cb: TurboQuantProdCodebook, codes, queries):
    """Unbiased <q, x>: the mse stage's product plus the sketch of the residual."""
    idx, signs, norms, gamma = _prod_split(cb, codes)
    levels = jnp.take(cb.mse.centroids, idx, axis=0)
    out = jnp.matmul(rotate(cb.mse.rotation, queries), levels.T, precision=_HIGHEST)
    return (out + sketch_inner(cb.qjl.projection, signs, gamma, queries)) * norms[None, :]


@jax.jit
def prod_sq_norms(cb: TurboQuantProdCodebook, codes):
    norms = _prod_split(cb, codes)[2]
    return norms * norms


def prod_validate(cb: TurboQuantProdCodebook) -> None:
    validate(cb.mse)
    if cb.qjl.projection.shape != (_dim(cb.mse), _dim(cb.mse)):
        raise ValueError(f"qjl.projection must be (d, d) = {(_dim(cb.mse),) * 2}, got {cb.qjl.projection.shape}")


_protocol.register(
    TurboQuantProdCodebook,
    methods={"turboquant_prod": fit_turboquant_prod},
    encode=prod_encode,
    decode=prod_decode,
    layout=prod_layout,
    dim=lambda cb: _dim(cb.mse),
    inner_product=prod_inner_product,
    sq_norms=prod_sq_norms,
    validate=prod_validate,
)
