"""QJL: the signs of m Gaussian projections of x, plus ||x||; an unbiased inner-product sketch.

QJL stores sign(S x) for S (m, d) with i.i.d. N(0, 1) entries, plus ||x||; the estimate
<q, x> ~ sqrt(pi / 2) / m * ||x|| * <S q, sign(S x)> is unbiased with variance
((pi / 2) ||q||^2 ||x||^2 - <q, x>^2) / m. The query is projected, never quantized (a sign
against a sign would be biased). TurboQuant-prod uses the same sketch on its residual.

Codes: m one-bit columns, then ||x|| in `norm_dtype` cut into one-bit columns (16 for float16).

References:
    Zandieh, Daliri & Han, "QJL: 1-bit quantized JL transform for KV cache quantization with
    zero overhead", arXiv 2406.03482, 2024.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Int

from vqlib import _checks
from vqlib._types import CodeLayout, pytree_dataclass, static_field
from vqlib.codebooks import _protocol
from vqlib.codebooks._side import FLOAT_DTYPES, columns_to_floats, floats_to_columns, side_columns

SQRT_HALF_PI = math.sqrt(math.pi / 2)
_HIGHEST = lax.Precision.HIGHEST


@pytree_dataclass
class QJLCodebook:
    """QJL: signs of m Gaussian projections plus ||x||.

    Attributes:
        projection: (m, d) float32 with i.i.d. N(0, 1) entries.
        norm_dtype: how ||x|| is stored: "float16" or "float32".
    """

    projection: jax.Array
    norm_dtype: str = static_field("float16")


# ----------------------------------------------------------------------------- the sketch (shared with TurboQuant-prod)


def sketch_signs(projection, r):
    """(n, d) vectors -> (n, m) int32 in {0, 1}: 1 where <S_i, r> >= 0."""
    return (jnp.matmul(r, projection.T, precision=_HIGHEST) >= 0).astype(jnp.int32)


def sketch_decode(projection, signs, scale):
    """(n, m) {0, 1} signs, (n,) scales -> (n, d): scale sqrt(pi / 2) / m S^T (2 signs - 1), unbiased."""
    weight = SQRT_HALF_PI / projection.shape[0] * scale
    return weight[:, None] * jnp.matmul((2 * signs - 1).astype(jnp.float32), projection, precision=_HIGHEST)


def sketch_inner(projection, signs, scale, queries):
    """(q, n) unbiased estimates of <queries, scale * r> from the signs of S r (r unit)."""
    sketched = jnp.matmul(queries.astype(jnp.float32), projection.T, precision=_HIGHEST)  # (q, m)
    dots = jnp.matmul(sketched, (2 * signs - 1).astype(jnp.float32).T, precision=_HIGHEST)
    return dots * (SQRT_HALF_PI / projection.shape[0] * scale)[None, :]


def check_norms(x, norm_dtype: str) -> None:
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


def unit_rows(x):
    """(n, d) -> (unit rows (zero rows stay zero), norms (n, 1)), in float32."""
    x = x.astype(jnp.float32)
    norms = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.where(norms > 0, norms, 1.0), norms


def check_fit(x, bits, norm_dtype, *, low: int, high: int) -> tuple[int, int]:
    """(d, bits) after checking x (finite, d >= 2), bits in [low, high] and norm_dtype."""
    x = _checks.check_float_array(x, "x", ndim=2, vectors=True)
    if x.shape[1] < 2:
        raise ValueError(f"x must have dimension d >= 2 for a random rotation or projection, got d={x.shape[1]}")
    bits = _checks.check_int(bits, "bits", low=low, high=high)
    if norm_dtype not in FLOAT_DTYPES:
        raise ValueError(f"norm_dtype must be one of {FLOAT_DTYPES}, got {norm_dtype!r}")
    return x.shape[1], bits


# ----------------------------------------------------------------------------- QJL codebook


def fit_qjl(key, x: Float[ArrayLike, "n d"], *, bits: int = 1, norm_dtype: str = "float16") -> QJLCodebook:
    """QJL with m = bits * d Gaussian projections (one sign bit each) plus the stored ||x||.

    Args:
        key: PRNG key of the projection (a key derived from it: data drawn from the same key
            would share its first rows with the projection).
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
    d, bits = check_fit(x, bits, norm_dtype, low=1, high=16)
    return QJLCodebook(jax.random.normal(jax.random.split(key)[1], (bits * d, d), jnp.float32), norm_dtype)


def layout(cb: QJLCodebook) -> CodeLayout:
    """m one-bit sign columns, then ||x|| in one-bit columns."""
    return CodeLayout(cb.projection.shape[0] + side_columns(1, cb.norm_dtype, 1), 2)


def _split(cb: QJLCodebook, codes):
    """codes -> (signs (n, m) in {0, 1}, ||x|| (n,))."""
    m = cb.projection.shape[0]
    return codes[:, :m], columns_to_floats(codes[:, m:], 1, cb.norm_dtype, 1)[:, 0]


@jax.jit
def _encode(cb: QJLCodebook, x):
    u, norms = unit_rows(x)
    return jnp.concatenate([sketch_signs(cb.projection, u), floats_to_columns(norms, cb.norm_dtype, 1)], 1)


def encode(cb: QJLCodebook, x: Float[Array, "n d"]) -> Int[Array, "n w"]:
    check_norms(x, cb.norm_dtype)
    return _encode(cb, x)


@jax.jit
def decode(cb: QJLCodebook, codes: Int[Array, "n w"]) -> Float[Array, "n d"]:
    """||x|| sqrt(pi / 2) / m S^T signs: unbiased in every direction."""
    signs, norms = _split(cb, codes)
    return sketch_decode(cb.projection, signs, norms)


@jax.jit
def inner_product(cb: QJLCodebook, codes, queries):
    signs, norms = _split(cb, codes)
    return sketch_inner(cb.projection, signs, norms, queries)


@jax.jit
def sq_norms(cb: QJLCodebook, codes):
    norms = _split(cb, codes)[1]
    return norms * norms


def validate(cb: QJLCodebook) -> None:
    if cb.projection.ndim != 2 or cb.projection.shape[1] < 2 or cb.projection.shape[0] < 1:
        raise ValueError(f"projection must be (m, d) with d >= 2, got {cb.projection.shape}")
    if cb.norm_dtype not in FLOAT_DTYPES:
        raise ValueError(f"norm_dtype must be one of {FLOAT_DTYPES}, got {cb.norm_dtype!r}")


_protocol.register(
    QJLCodebook,
    methods={"qjl": fit_qjl},
    encode=encode,
    decode=decode,
    layout=layout,
    dim=lambda cb: cb.projection.shape[1],
    inner_product=inner_product,
    sq_norms=sq_norms,
    validate=validate,
)
