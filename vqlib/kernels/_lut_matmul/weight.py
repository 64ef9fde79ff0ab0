"""LUTWeight: a linear layer's weight W (out, in) stored as codes plus codebooks, and its decoding.

Layouts (codes always (m, out, in // v): m codes per group of v input columns):
    "scalar": v = 1, m = 1; codebooks (out, in // group, kc): a scalar codebook per row and group
        of `group` columns. W[o, c] = codebooks[o, c // group, codes[0, o, c]].
    "vq":     m = 1; codebooks (s, kc, v), s = 1 (one shared codebook) or in // v (PQ: one per
        column block). W[o, j v + p] = codebooks[j % s, codes[0, o, j], p].
    "aq":     codebooks (m, kc, v): W[o, j v + p] = sum_i codebooks[i, codes[i, o, j], p].
    "e8p":    v = 8, m = 1; codebooks (256, 8): QuIP#'s absolute patterns; 16-bit codes as in
        `vqlib.codebooks` E8P (bits 8-15 pattern, 1-7 signs, 0 the +-1/4 shift).
Every row is then multiplied by scales[o].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Int

from vqlib._types import pytree_dataclass, static_field

LUT_KINDS = ("scalar", "vq", "aq", "e8p")


@pytree_dataclass
class LUTWeight:
    """W (out, in) ~ scales[:, None] * decode(codes, codebooks); see the module docstring.

    Attributes:
        codes: (m, out, in // v) integer codes (uint8 / uint16 / int32).
        codebooks: float codebooks, shape by kind.
        scales: (out,) float32 per-row scales.
        kind: "scalar", "vq", "aq" or "e8p".
        group: "scalar" only: input columns per scalar codebook.
    """

    codes: jax.Array
    codebooks: jax.Array
    scales: jax.Array
    kind: str = static_field("vq")
    group: int = static_field(0)

    @property
    def vector_size(self) -> int:
        return 1 if self.kind == "scalar" else self.codebooks.shape[-1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[1], self.codes.shape[2] * self.vector_size


def lut_weight(
    kind: str,
    codes: Int[ArrayLike, "m d_out g"],
    codebooks: Float[ArrayLike, "..."],
    scales: Float[ArrayLike, " d_out"] | None = None,
    *,
    group: int = 0,
) -> LUTWeight:
    """Builds and checks a LUTWeight; `scales` default to ones."""
    if kind not in LUT_KINDS:
        raise ValueError(f"kind must be one of {LUT_KINDS}, got {kind!r}")
    codes, codebooks = jnp.asarray(codes), jnp.asarray(codebooks)
    if codes.ndim != 3 or not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"codes must be an integer (m, out, in // v) array, got {codes.dtype} {codes.shape}")
    m, out, groups = codes.shape
    want = {
        "scalar": (out, groups // max(group, 1), None),
        "vq": (None, None, None),
        "aq": (m, None, None),
        "e8p": (256, 8),
    }[kind]
    if codebooks.ndim != len(want) or any(w is not None and w != s for w, s in zip(want, codebooks.shape, strict=True)):
        raise ValueError(f"{kind} codebooks must have shape {want} (None: any), got {codebooks.shape}")
    if kind == "scalar" and (group < 1 or groups % group):
        raise ValueError(f"scalar weights need group >= 1 dividing in={groups}, got group={group}")
    if kind == "vq" and codebooks.shape[0] not in (1, groups):
        raise ValueError(f"vq codebooks (s, kc, v) need s = 1 or s = in // v = {groups}, got s={codebooks.shape[0]}")
    if kind != "aq" and m != 1:
        raise ValueError(f"{kind} codes must have m = 1 (shape (1, out, in // v)), got m={m}")
    scales = jnp.ones((out,), jnp.float32) if scales is None else jnp.asarray(scales, jnp.float32)
    if scales.shape != (out,):
        raise ValueError(f"scales must have shape ({out},), one per output row, got {scales.shape}")
    return LUTWeight(codes=codes, codebooks=codebooks, scales=scales, kind=kind, group=group)


def e8p_decode(codes: jax.Array, patterns: jax.Array) -> jax.Array:
    """16-bit codes (...) -> (..., 8) float32 points of E8 + 1/4 (the `vqlib.codebooks` E8P rule)."""
    codes = codes.astype(jnp.int32)
    a = jnp.take(patterns.astype(jnp.float32), codes >> 8, axis=0)  # (..., 8) absolute values
    bit = lax.broadcasted_iota(jnp.int32, a.shape, codes.ndim)
    negative = (codes[..., None] >> bit) & 1
    twice = jnp.round(2 * a).astype(jnp.int32)
    first = (jnp.sum(twice, -1) // 2 - jnp.sum(negative[..., 1:], -1)) % 2
    negative = jnp.concatenate([first[..., None], negative[..., 1:]], -1)
    shift = jnp.where((codes & 1) == 1, 0.25, -0.25)[..., None]
    return (1 - 2 * negative).astype(jnp.float32) * a + shift


@jax.jit
def dequantize(w: LUTWeight) -> Float[Array, "d_out d_in"]:
    """The (out, in) float32 weight that `w` stores."""
    m, out, groups = w.codes.shape
    codes = w.codes.astype(jnp.int32)
    cb = w.codebooks.astype(jnp.float32)
    if w.kind == "scalar":
        which = jnp.arange(groups) // w.group  # (in,)
        dense = cb[jnp.arange(out)[:, None], which[None, :], codes[0]]
    elif w.kind == "vq":
        blocks = jnp.arange(groups) % cb.shape[0]
        dense = cb[blocks[None, :], codes[0]]  # (out, groups, v)
    elif w.kind == "aq":
        dense = sum(cb[i][codes[i]] for i in range(m))
    else:
        dense = e8p_decode(codes[0], cb)
    return dense.reshape(out, -1) * w.scales[:, None]
