"""The E8 lattice quantizer and QuIP#'s E8P codebook: 8-dimensional blocks, integer codes.

x (n, d) is optionally rotated (`Rotation`), divided by a step and cut into d / 8 blocks of 8;
each block is coded as one point of a finite codebook, and decoded as step * point.

"e8": the 2**(8 b) points of the lattice E8 = D8 u (D8 + 1/2) of smallest norm (b = 1: the 241
points of norm^2 <= 2 and 15 of the +-2 e_i, QuIP#'s E81B; b = 2: the 56,881 points of norm^2
<= 10 and 8,655 of norm^2 12; within a shell, points with a larger coordinate come first, then
lexicographic order). A block is coded by the exact nearest lattice point (Conway & Sloane's
decoder: round to D8, fixing the parity on the worst-rounded coordinate, and the same for
D8 + 1/2); a block whose nearest point lies outside the codebook (overload) is shrunk towards 0,
by bisection on the factor, until it does not.

"e8p": QuIP#'s E8P, 2 bits per weight: 256 absolute patterns (the 227 of D8 + 1/2 with norm^2
<= 10 and 29 of norm^2 12), the 2**7 sign choices with an even coordinate sum, and a shift of
+-1/4, 65,536 points of E8 + 1/4. Code bits: 8..15 the pattern, j = 1..7 "coordinate j is
negative" (coordinate 0's sign follows from the parity), 0 the shift (1: +1/4). The encoder is
exact: for each shift and pattern the best signs are those of the block, with one flip of the
coordinate of least a_i |x_i| when the parity is wrong; the best of the 512 candidates wins.
QuIP# puts a randomized Hadamard transform in front (the default here) and sets the step to
RMS / 1.03 (`rms_scale`); `bits=3` and `bits=4` add a second stage on the residual (the
`residual` field: an "e8" stage of 1 bit, or a second E8P), as QuIP#'s RVQ codebooks do.

With `rms_scale=None` the step is fitted: the one of least mean squared error on (a sample of)
x, over a grid of steps 2**(1/4) apart, refined 2**(1/20) apart.

References:
    Conway & Sloane, "Fast quantizing and decoding algorithms for lattice quantizers and
    codes", IEEE Trans. Information Theory, 1982.
    Tseng, Chee, Sun, Kuleshov & De Sa, "QuIP#: even better LLM quantization with Hadamard
    incoherence and lattice codebooks", ICML 2024 (arXiv 2402.04396); E8P's 29 norm-12
    patterns are `get_norm12()` of lib/codebook/latticee8_padded12.py in Cornell-RelaxML/quip-sharp.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Int

from vqlib import _checks
from vqlib._types import CodeLayout, pytree_dataclass, static_field
from vqlib.codebooks import _protocol
from vqlib.codebooks._hadamard import ROTATIONS, Rotation, random_rotation, rotate, unrotate
from vqlib.kernels import lut_weight as lut_weight_op

KINDS = ("e8", "e8p")
_BLOCK = 8
_SAMPLE_BLOCKS = 8192  # blocks of x used to fit the step
_BISECTION_STEPS = 20
# E8P's 29 absolute patterns of norm^2 12 (five 3/2 and three 1/2), as twice their coordinates.
_NORM12 = (
    "31113333 13113333 11313333 11133333 33313311 33313131 33311331 33313113 33311313 33311133 "
    "33133311 33133131 33131331 33133113 33131313 33131133 31333311 31333131 31331331 31333113 "
    "31331313 13331133 13333311 13333131 13331331 13333113 13331313 11331333 33113331"
).split()


@pytree_dataclass
class E8Codebook:
    """x ~ unrotate(step * points[codes]), one point of 8 coordinates per block.

    Attributes:
        step: () float32 scale of the lattice.
        rotation: the Rotation applied before coding, or None.
        dim: d, the vector length (a static field: with no rotation no array has that shape).
        bits: bits per coordinate of this stage (8 * bits per block): 1 or 2 for "e8", 2 for "e8p".
        kind: "e8" (smallest points of E8) or "e8p" (QuIP#'s E8P).
        residual: a second stage (no rotation of its own) coding what this one leaves, or None.
            Codes: this stage's d / 8 columns, then the residual stage's.
    """

    step: jax.Array
    rotation: Rotation | None = None
    dim: int = static_field(8)
    bits: int = static_field(2)
    kind: str = static_field("e8")
    residual: E8Codebook | None = None


# ----------------------------------------------------------------------------- the E8 lattice


def _nearest_d8(y):
    """Nearest point of D8 (integer vectors of even sum): round, and if the sum is odd, round
    the coordinate with the largest rounding error the other way."""
    r = jnp.round(y)
    err = y - r
    worst = jnp.argmax(jnp.abs(err), axis=-1, keepdims=True)
    flip = jnp.where(jnp.take_along_axis(err, worst, axis=-1) >= 0, 1.0, -1.0).astype(y.dtype)
    odd = (jnp.sum(r, axis=-1, keepdims=True) % 2) != 0
    hit = lax.broadcasted_iota(worst.dtype, y.shape, y.ndim - 1) == worst
    return r + jnp.where(odd & hit, flip, jnp.zeros_like(flip))


def nearest_e8(y: Float[ArrayLike, "*b 8"]) -> Float[Array, "*b 8"]:
    """The nearest point of the E8 lattice to each 8-vector of y (..., 8) (Conway & Sloane).

    Example:
        >>> import jax.numpy as jnp
        >>> from vqlib.codebooks import nearest_e8
        >>> nearest_e8(jnp.array([0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4])).tolist()
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    """
    if y.shape[-1:] != (_BLOCK,):
        raise ValueError(f"nearest_e8 takes vectors of shape (..., 8), got {tuple(y.shape)}")
    y = y.astype(jnp.float32)
    half = jnp.asarray(0.5, y.dtype)
    a, b = _nearest_d8(y), _nearest_d8(y - half) + half
    closer = jnp.sum((y - a) ** 2, -1, keepdims=True) <= jnp.sum((y - b) ** 2, -1, keepdims=True)
    return jnp.where(closer, a, b)


def _key(doubled, xp=jnp):
    """Twice a lattice point, coordinates in [-6, 6] -> one int32 key (base-13 digits, < 2**30)."""
    return xp.matmul(doubled + 6, xp.asarray(13 ** np.arange(_BLOCK), dtype=xp.int32))


@functools.cache
def _ball(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The 2**(8 bits) codebook points of "e8", twice their coordinates (int32), sorted by key; the keys."""
    found = []
    for coset in (np.arange(-6, 7, 2), np.arange(-5, 6, 2)):  # twice D8's and D8 + 1/2's coordinates
        points = coset[:, None]
        for _ in range(_BLOCK - 1):  # extend one coordinate at a time, pruning norm^2 > 12
            points = np.concatenate([np.repeat(points, len(coset), 0), np.tile(coset, len(points))[:, None]], 1)
            points = points[np.sum(points**2, 1) <= 48]
        found.append(points[np.sum(points, 1) % 4 == 0])  # even coordinate sum
    points = np.concatenate(found)
    order = np.lexsort((*points.T[::-1], -np.abs(points).max(1), np.sum(points**2, 1)))
    points = points[order[: 2 ** (_BLOCK * bits)]].astype(np.int32)
    keys = _key(points, np)
    by_key = np.argsort(keys)
    return points[by_key], keys[by_key]


def _ball_lookup(bits: int, p):
    """Lattice points p (..., 8) -> (codes, whether p is in the codebook)."""
    points, keys = _ball(bits)
    limit = int(np.max(np.sum(points.astype(np.int64) ** 2, 1)))
    doubled = jnp.round(2 * p).astype(jnp.int32)
    inside = jnp.sum(doubled * doubled, axis=-1) <= limit  # also keeps the key digits in [0, 12]
    key = _key(jnp.clip(doubled, -6, 6))
    keys = jnp.asarray(keys)
    code = jnp.clip(jnp.searchsorted(keys, key), 0, keys.shape[0] - 1).astype(jnp.int32)
    return code, inside & (keys[code] == key)


def _encode_ball(bits: int, y):
    """Blocks y (..., 8), in lattice units -> codes of "e8": nearest point, shrunk on overload."""
    code, ok = _ball_lookup(bits, nearest_e8(y))

    def bisect(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        inside = _ball_lookup(bits, nearest_e8(mid[..., None] * y))[1]
        return jnp.where(inside, mid, lo), jnp.where(inside, hi, mid)

    lo, _ = lax.fori_loop(0, _BISECTION_STEPS, bisect, (ok.astype(y.dtype), jnp.ones(ok.shape, y.dtype)))
    return jnp.where(ok, code, _ball_lookup(bits, nearest_e8(lo[..., None] * y))[0])


def _decode_ball(bits: int, codes):
    return jnp.take(jnp.asarray(_ball(bits)[0], jnp.float32), codes, axis=0) / 2


# ----------------------------------------------------------------------------- E8P


@functools.cache
def _e8p_patterns() -> np.ndarray:
    """(256, 8) int32: twice E8P's absolute patterns, the 227 of norm^2 <= 10 in lexicographic order, then the 29."""
    grid = np.stack(np.meshgrid(*[np.array([1, 3, 5])] * _BLOCK, indexing="ij"), -1).reshape(-1, _BLOCK)
    small = grid[np.sum(grid**2, 1) <= 40]
    extra = np.array([[int(c) for c in p] for p in _NORM12])
    return np.concatenate([small, extra]).astype(np.int32)


def _decode_e8p(codes):
    """16-bit codes (...) -> (..., 8) points of E8 + 1/4."""
    patterns = jnp.asarray(_e8p_patterns())
    a = jnp.take(patterns, codes >> 8, axis=0)  # twice the absolute values, odd integers
    bit = lax.broadcasted_iota(codes.dtype, (*codes.shape, _BLOCK), codes.ndim)
    negative = (codes[..., None] >> bit) & 1  # bit 0 (the shift) is replaced below
    # coordinate 0's sign makes sum(s a) even: sum(s 2a) = 0 mod 4 <=> #negative = sum(2a) / 2 mod 2
    first = (jnp.sum(a, -1) // 2 - jnp.sum(negative[..., 1:], -1)) % 2
    negative = negative.at[..., 0].set(first)
    shift = jnp.where((codes & 1) == 1, 0.25, -0.25)[..., None]
    return (1 - 2 * negative).astype(jnp.float32) * a.astype(jnp.float32) / 2 + shift


def _encode_e8p_block(y):
    """One block (8,) -> its 16-bit E8P code, exactly the nearest of the 65,536 points."""
    patterns = jnp.asarray(_e8p_patterns())
    a = patterns.astype(jnp.float32) / 2  # (256, 8)
    shifted = y[None, :] - jnp.array([[-0.25], [0.25]], jnp.float32)  # (2, 8): shift bit 0, 1
    mag = jnp.abs(shifted)
    corr = jnp.matmul(mag, a.T, precision=lax.Precision.HIGHEST)  # (2, 256): <x', s a> with s = sign(x')
    negatives = jnp.sum(shifted < 0, -1)  # (2,)
    wrong = (jnp.sum(patterns, -1)[None, :] // 2 + negatives[:, None]) % 2 == 1  # (2, 256)
    cost = a[None] * mag[:, None, :]  # (2, 256, 8): what flipping coordinate i loses
    corr = corr - jnp.where(wrong, 2.0 * jnp.min(cost, -1), 0.0)
    score = jnp.sum(shifted * shifted, -1, keepdims=True) + jnp.sum(a * a, -1)[None] - 2.0 * corr  # ||x' - s a||^2
    best = jnp.argmin(score.reshape(-1))
    shift, pattern = best // 256, best % 256
    negative = (shifted[shift] < 0).astype(jnp.int32)
    flip = jnp.arange(_BLOCK) == jnp.argmin(cost[shift, pattern])
    negative = jnp.where(wrong[shift, pattern] & flip, 1 - negative, negative)
    sign_bits = jnp.sum(negative[1:] << jnp.arange(1, _BLOCK), -1)
    return (pattern << 8) | sign_bits | shift


def _encode_e8p(y):
    """Blocks (N, 8) -> (N,) codes, in chunks of 1,024 blocks (8 MB of candidate costs each)."""
    return lax.map(_encode_e8p_block, y, batch_size=1024).astype(jnp.int32)


# ----------------------------------------------------------------------------- the codebook


def _quantize_blocks(kind: str, bits: int, y):
    """Blocks (N, 8) in lattice units -> (N,) codes."""
    return _encode_e8p(y) if kind == "e8p" else _encode_ball(bits, y)


def _points(kind: str, bits: int, codes):
    return _decode_e8p(codes) if kind == "e8p" else _decode_ball(bits, codes)


def _blocks(cb: E8Codebook, x):
    """(n, d) -> (n * d / 8, 8) rotated blocks in lattice units."""
    x = x.astype(jnp.float32)
    if cb.rotation is not None:
        x = rotate(cb.rotation, x)
    return x.reshape(-1, _BLOCK) / cb.step


@jax.jit
def _encode(cb: E8Codebook, x):
    return _quantize_blocks(cb.kind, cb.bits, _blocks(cb, x)).reshape(x.shape[0], -1)


@jax.jit
def _decode(cb: E8Codebook, codes):
    x = (cb.step * _points(cb.kind, cb.bits, codes)).reshape(codes.shape[0], -1)
    return x if cb.rotation is None else unrotate(cb.rotation, x)


@functools.partial(jax.jit, static_argnames=("kind", "bits"))
def _best_step(y, *, kind: str, bits: int):
    """The step of least squared error for blocks y (N, 8): a grid 2**(1/4) apart around RMS(y), refined."""

    def error(step):
        return jnp.mean((y - step * _points(kind, bits, _quantize_blocks(kind, bits, y / step))) ** 2)

    rms = jnp.sqrt(jnp.mean(y * y))
    coarse = rms * 2.0 ** jnp.linspace(-3.0, 3.0, 25)
    best = coarse[jnp.argmin(lax.map(error, coarse))]
    fine = best * 2.0 ** jnp.linspace(-0.25, 0.25, 11)
    return fine[jnp.argmin(lax.map(error, fine))]


def _fit(key, x, *, kind: str, bits: int, rotation, rms_scale) -> E8Codebook:
    x = _checks.check_float_array(x, "x", ndim=2, vectors=True)
    if x.shape[1] % _BLOCK:
        padded = _BLOCK * -(-x.shape[1] // _BLOCK)
        raise ValueError(
            f"x has d={x.shape[1]}, not a multiple of the E8 block of 8 coordinates; pad x with zero columns "
            f"to d={padded}: jnp.pad(x, ((0, 0), (0, {padded - x.shape[1]})))"
        )
    if rotation is not None and rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS} or None, got {rotation!r}")
    if rms_scale is not None:  # QuIP#'s default is 1.03; None fits the step
        rms_scale = _checks.check_positive_float(rms_scale, "rms_scale")
    rotation_key, sample_key = jax.random.split(key)
    rot = None if rotation is None else random_rotation(rotation_key, x.shape[1], kind=rotation)
    unit = E8Codebook(jnp.ones((), jnp.float32), rot, x.shape[1], bits, kind)
    y = _blocks(unit, x)
    if rms_scale is not None:
        return dataclasses.replace(unit, step=jnp.sqrt(jnp.mean(y * y)) / rms_scale)
    if y.shape[0] > _SAMPLE_BLOCKS:
        y = y[jax.random.choice(sample_key, y.shape[0], (_SAMPLE_BLOCKS,), replace=False)]
    return dataclasses.replace(unit, step=_best_step(y, kind=kind, bits=bits))


def fit_e8(
    key, x: Float[ArrayLike, "n d"], *, bits: int = 2, rotation: str | None = None, rms_scale: float | None = None
) -> E8Codebook:
    """The E8 lattice quantizer: the 2**(8 bits) smallest points of E8 per block of 8 coordinates.

    Args:
        key: PRNG key (rotation; sample for the step search).
        x: (n, d) training vectors, d a multiple of 8 (pad with zero columns otherwise).
        bits: bits per coordinate, 1 (256 points per block) or 2 (65,536).
        rotation: None (code x as it is), "hadamard" or "dense" (a random rotation first).
        rms_scale: None to fit the step on x (least squared error), or a number s for step = RMS / s.

    Returns:
        E8Codebook of kind "e8"; codes are (n, d / 8) in [0, 2**(8 bits)).

    Example:
        >>> import jax, vqlib
        >>> x = jax.random.normal(jax.random.key(1), (1000, 16))
        >>> cb = vqlib.fit(x, "e8", bits=1)
        >>> codes = vqlib.encode(cb, x)
        >>> codes.shape, vqlib.code_layout(cb).bits_per_vector
        ((1000, 2), 16)
    """
    bits = _checks.check_int(bits, "bits", low=1, high=2)
    return _fit(key, x, kind="e8", bits=bits, rotation=rotation, rms_scale=rms_scale)


def fit_e8p(
    key, x: Float[ArrayLike, "n d"], *, bits: int = 2, rotation: str | None = "hadamard", rms_scale: float | None = 1.03
) -> E8Codebook:
    """QuIP#'s E8P codebook (2 bits per coordinate), with a 1- or 2-bit residual stage for 3 and 4 bits.

    Args:
        key: PRNG key (rotation; sample for a step search).
        x: (n, d) training vectors, d a multiple of 8 (pad with zero columns otherwise).
        bits: 2 (E8P), 3 (E8P, then a 1-bit "e8" stage on the residual) or 4 (E8P, then E8P).
        rotation: "hadamard" (QuIP#'s RHT, default), "dense" or None.
        rms_scale: the first stage's step is RMS(rotated x) / rms_scale (QuIP#: 1.03); None fits
            it. Residual stages always fit their step.

    Returns:
        E8Codebook of kind "e8p" for every bit width: codes (n, d / 8) of 16 bits, and for 3 and 4
        bits its `residual` stage's d / 8 more columns.

    Example:
        >>> import jax, vqlib
        >>> x = jax.random.normal(jax.random.key(1), (1000, 16))
        >>> cb = vqlib.fit(x, "e8p")
        >>> x_hat = vqlib.decode(cb, vqlib.encode(cb, x))
        >>> round(float(((x - x_hat) ** 2).mean()), 2)                 # QuIP#: 0.092 on N(0, 1)
        0.09
    """
    bits = _checks.check_int(bits, "bits", low=2, high=4)
    first_key, second_key = jax.random.split(key)
    first = _fit(first_key, x, kind="e8p", bits=2, rotation=rotation, rms_scale=rms_scale)
    if bits == 2:
        return first
    x = _checks.check_float_array(x, "x", ndim=2, vectors=True).astype(jnp.float32)
    left = x - _decode(first, _encode(first, x))
    kind, stage_bits = ("e8", 1) if bits == 3 else ("e8p", 2)
    second = _fit(second_key, left, kind=kind, bits=stage_bits, rotation=None, rms_scale=None)
    return dataclasses.replace(first, residual=second)


def _columns(cb: E8Codebook) -> int:
    return cb.dim // _BLOCK


def encode(cb: E8Codebook, x: Float[ArrayLike, "n d"]) -> Int[Array, "n w"]:
    """(n, d) vectors -> (n, d / 8) int32 codes, one per block of 8 (rotated) coordinates, then the
    residual stage's codes of what this stage leaves."""
    codes = _encode(cb, x)
    if cb.residual is None:
        return codes
    left = x.astype(jnp.float32) - _decode(cb, codes)
    return jnp.concatenate([codes, encode(cb.residual, left)], axis=1)


def decode(cb: E8Codebook, codes: Int[Array, "n w"]) -> Float[Array, "n d"]:
    """(n, d / 8) codes (more columns with a residual stage) -> (n, d) float32 reconstructions."""
    w = _columns(cb)
    x_hat = _decode(cb, codes[:, :w])
    return x_hat if cb.residual is None else x_hat + decode(cb.residual, codes[:, w:])


def layout(cb: E8Codebook) -> CodeLayout:
    """d / 8 codes per vector, each of 8 * bits bits; a residual stage adds its columns (packed at
    the wider stage's width: a 3-bit E8P stores its 8-bit residual codes in 16-bit columns)."""
    own = CodeLayout(_columns(cb), 2 ** (_BLOCK * cb.bits))
    if cb.residual is None:
        return own
    more = layout(cb.residual)
    return CodeLayout(own.num_codebooks + more.num_codebooks, max(own.num_codes, more.num_codes))


def lut_weight(cb: E8Codebook, codes: Int[Array, "n w"], shape: tuple[int, int]):
    """E8P codes of an unrotated weight: `lut_matmul`'s "e8p" kind with the step as the row scale."""
    if cb.kind != "e8p" or cb.rotation is not None or cb.residual is not None:
        raise NotImplementedError(
            "only a single-stage E8P codebook without rotation has a LUTWeight form; rotate the weight and the "
            "activations yourself (QuIP#'s incoherence) and fit with rotation=None"
        )
    out, cols = shape
    patterns = jnp.asarray(_e8p_patterns(), jnp.float32) / 2
    return lut_weight_op("e8p", codes.reshape(1, out, cols // _BLOCK), patterns, jnp.full((out,), cb.step))


def validate(cb: E8Codebook) -> None:
    if cb.kind not in KINDS or cb.bits not in ((1, 2) if cb.kind == "e8" else (2,)):
        raise ValueError(f"kind {cb.kind!r} with bits={cb.bits!r} is not an E8 codebook vqlib writes")
    if not isinstance(cb.dim, int) or cb.dim < _BLOCK or cb.dim % _BLOCK:
        raise ValueError(f"dim must be a positive multiple of 8, got {cb.dim!r}")
    if cb.step.shape != () or not float(cb.step) > 0:
        raise ValueError(f"step must be a positive scalar, got shape {cb.step.shape}")
    if cb.rotation is not None and cb.rotation.signs.shape != (cb.dim,):
        raise ValueError(f"the rotation acts on d={cb.rotation.signs.shape[0]}, the codebook on d={cb.dim}")
    if cb.residual is not None:
        if cb.residual.dim != cb.dim or cb.residual.residual is not None or cb.residual.rotation is not None:
            raise ValueError("the residual stage must code the same d, with no rotation or stage of its own")
        validate(cb.residual)


_protocol.register(
    E8Codebook,
    methods={"e8": fit_e8, "e8p": fit_e8p},
    encode=encode,
    decode=decode,
    layout=layout,
    dim=lambda cb: cb.dim,
    lut_weight=lut_weight,
    validate=validate,
)
