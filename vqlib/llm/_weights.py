"""Compressed linear weights as stored, and `linear`, the one matmul of the decoder.

A compressed (out, in) weight is a `CompressedWeight`: one or more additive `CodedPart`s
(QuIP#'s residual stages; one part for the other methods), optionally between two randomized
Hadamard transforms (QuIP#'s incoherence processing):

    W = R_out^T (sum_p W_p) R_in,      y = x W^T = unrotate(R_out, sum_p (rotate(R_in, x) W_p^T))

A part holds its codes bit-packed (`vqlib.codebooks.pack_codes`, uint8), its codebooks and
scales in float16, and is turned into a `vqlib.kernels.LUTWeight` (codes unpacked to int32,
codebooks expanded) inside the compiled forward, where `vqlib.kernels.lut_matmul` computes
x W_p^T. So the params of a compressed model never hold the float matrix, and the bytes of the
saved file are the bytes the bits-per-weight figure counts. Part kinds (codebooks as stored):

    "affine": (out, ceil(in / group), 2) per row and group of `group` columns: (step, offset),
              level q = offset + step * q, q in [0, 2**bits) (round-to-nearest); a last, shorter
              group is allowed (in need not be a multiple of group).
    "scalar": (in / group, 2**bits) one scalar codebook per group of columns, shared by all rows.
    "vq":     (in / group, 2**bits, v) one v-dim codebook per group of columns (group % v == 0).
    "aq":     (m, 2**bits, v) m additive codebooks shared by the whole matrix (AQLM).
    "e8p":    none: QuIP#'s E8P, 16-bit codes per 8 weights (bits = 16).
    "e8":     none: the 256 smallest points of E8 (QuIP#'s E81B), 8-bit codes per 8 weights.
scales: (out,) or (1,) float16, multiplying every row.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vqlib._types import pytree_dataclass, static_field
from vqlib.codebooks import E8Codebook, Rotation, decode, pack_codes, rotate, unpack_codes, unrotate
from vqlib.kernels import LUTWeight, lut_matmul

PART_KINDS = ("affine", "scalar", "vq", "aq", "e8p", "e8")


@functools.cache
def _lattice_codebook(kind: str) -> np.ndarray:
    """E8P's (256, 8) absolute patterns, or E81B's (256, 8) points, read off vqlib's E8 decoders."""
    with jax.ensure_compile_time_eval():  # constants, also when first needed while tracing
        if kind == "e8p":  # code (p << 8) | 1: pattern p, no negative signs, shift +1/4
            cb = E8Codebook(jnp.ones((), jnp.float32), None, 8, 2, "e8p")
            points = decode(cb, (np.arange(256, dtype=np.int32) << 8 | 1)[:, None])
            return np.abs(np.asarray(points) - 0.25).astype(np.float32)
        cb = E8Codebook(jnp.ones((), jnp.float32), None, 8, 1, "e8")
        return np.asarray(decode(cb, np.arange(256, dtype=np.int32)[:, None]), np.float32)


@pytree_dataclass
class CodedPart:
    """One additive part of a compressed weight: packed codes, float16 codebooks and scales.

    Attributes:
        codes: (m, out, ceil(groups * bits / 8)) uint8; `groups = in / v` codes per row and
            codebook, bit-packed along the last axis.
        codebooks: float16, shape by kind (module docstring); None for "e8p" and "e8".
        scales: (out,) or (1,) float16 row scales.
        kind: one of PART_KINDS.
        bits: bits per code.
        group: "affine", "scalar", "vq": columns per group (per codebook).
        shape: (out, in) of the weight.
    """

    codes: jax.Array
    codebooks: jax.Array | None
    scales: jax.Array
    kind: str = static_field("affine")
    bits: int = static_field(4)
    group: int = static_field(0)
    shape: tuple = static_field((0, 0))

    @property
    def vector_size(self) -> int:
        if self.kind in ("affine", "scalar"):
            return 1
        if self.kind in ("e8p", "e8"):
            return 8
        return self.codebooks.shape[-1]

    @property
    def padded_in(self) -> int:
        """Columns of the LUTWeight: `in` rounded up to whole groups (only "affine" pads)."""
        if self.kind != "affine":
            return self.shape[1]
        return -(-self.shape[1] // self.group) * self.group

    def lut_weight(self) -> LUTWeight:
        """The `vqlib.kernels.LUTWeight` of this part, (out, padded_in); cheap, jit-friendly."""
        out, n_in = self.shape
        groups = n_in // self.vector_size
        codes = unpack_codes(self.codes, self.bits, groups)  # (m, out, groups) int32
        scales = jnp.broadcast_to(self.scales.astype(jnp.float32), (out,))
        k = 2**self.bits
        if self.kind == "affine":
            pad = self.padded_in - n_in
            codes = jnp.pad(codes, ((0, 0), (0, 0), (0, pad)))
            cb = self.codebooks.astype(jnp.float32)  # (out, ngroups, 2)
            levels = jnp.arange(k, dtype=jnp.float32)[None, None, :]
            codebooks = cb[..., 1:2] + cb[..., 0:1] * levels
            return LUTWeight(codes, codebooks, scales, kind="scalar", group=self.group)
        if self.kind == "scalar":
            codebooks = jnp.broadcast_to(self.codebooks[None], (out, *self.codebooks.shape))
            return LUTWeight(codes, codebooks, scales, kind="scalar", group=self.group)
        if self.kind == "vq":
            codebooks = jnp.repeat(self.codebooks, self.group // self.vector_size, axis=0)
            return LUTWeight(codes, codebooks, scales, kind="vq")
        if self.kind == "aq":
            return LUTWeight(codes, self.codebooks, scales, kind="aq")
        table = jnp.asarray(_lattice_codebook(self.kind))
        if self.kind == "e8p":
            return LUTWeight(codes, table, scales, kind="e8p")
        return LUTWeight(codes, table[None], scales, kind="vq")

    def take_rows(self, rows: jax.Array) -> CodedPart:
        """The part restricted to output rows `rows` (n,) (embedding lookups)."""
        codebooks = self.codebooks[rows] if self.kind == "affine" else self.codebooks
        scales = self.scales if self.scales.shape[0] == 1 else self.scales[rows]
        return dataclasses.replace(
            self, codes=self.codes[:, rows], codebooks=codebooks, scales=scales, shape=(rows.shape[0], self.shape[1])
        )


def coded_part(kind: str, codes, codebooks, scales, *, bits: int, group: int = 0, shape=None) -> CodedPart:
    """Packs int codes (m, out, groups) and stores codebooks and scales in float16.

    Raises:
        ValueError: codes that do not fit in `bits`, or shapes that do not match the kind.
    """
    if kind not in PART_KINDS:
        raise ValueError(f"kind must be one of {PART_KINDS}, got {kind!r}")
    codes = jnp.asarray(codes)
    if codes.ndim != 3:
        raise ValueError(f"codes must be (m, out, groups), got shape {codes.shape}")
    scales = jnp.asarray(scales, jnp.float32).reshape(-1).astype(jnp.float16)
    if codebooks is not None:
        codebooks = jnp.asarray(codebooks, jnp.float32).astype(jnp.float16)
    part = CodedPart(pack_codes(codes, bits), codebooks, scales, kind=kind, bits=bits, group=group, shape=tuple(shape))
    if codes.shape[2] * part.vector_size != shape[1] or codes.shape[1] != shape[0]:
        raise ValueError(f"codes {codes.shape} of vector size {part.vector_size} do not cover a weight {shape}")
    return part


@pytree_dataclass
class PackedRotation:
    """A `vqlib.codebooks.Rotation` as stored: sign bits packed 8 per byte, the factor in float32.

    Attributes:
        signs: (ceil(d / 8),) uint8, bit j set when sign j is -1.
        factor: (K, K) float32 orthogonal Kronecker factor.
        dim: d.
    """

    signs: jax.Array
    factor: jax.Array
    dim: int = static_field(0)

    @staticmethod
    def of(rot: Rotation) -> PackedRotation:
        negative = (rot.signs < 0).astype(jnp.int32)
        return PackedRotation(pack_codes(negative, 1), rot.factor.astype(jnp.float32), dim=rot.signs.shape[0])

    def rotation(self) -> Rotation:
        negative = unpack_codes(self.signs, 1, self.dim)
        return Rotation((1 - 2 * negative).astype(jnp.float32), self.factor)


@pytree_dataclass
class CompressedWeight:
    """W (out, in) = R_out^T (sum of parts) R_in; see the module docstring.

    Attributes:
        parts: the additive CodedParts, each of shape (out, in).
        rotation_in: PackedRotation of the input side (size in), or None.
        rotation_out: PackedRotation of the output side (size out), or None.
    """

    parts: tuple
    rotation_in: PackedRotation | None = None
    rotation_out: PackedRotation | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.parts[0].shape


def linear(x: jax.Array, w, *, impl: str = "auto") -> jax.Array:
    """y = x @ W^T for a float weight (out, in), a `LUTWeight` or a `CompressedWeight`.

    Compressed weights go through `vqlib.kernels.lut_matmul`, which decodes on chip (Pallas) or
    tile by tile (XLA); no float copy of W is kept between calls.

    Args:
        x: (..., in) activations.
        w: float (out, in) array, LUTWeight or CompressedWeight.
        impl: the `lut_matmul` backend for compressed weights.

    Returns:
        (..., out) float32 for float32 x.

    Example:
        >>> import jax.numpy as jnp
        >>> from vqlib.llm import linear
        >>> linear(jnp.ones((2, 3)), jnp.ones((4, 3))).shape
        (2, 4)
    """
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in)
    if isinstance(w, LUTWeight):
        y = lut_matmul(x2, w, impl=impl)
    elif isinstance(w, CompressedWeight):
        if w.rotation_in is not None:
            x2 = rotate(w.rotation_in.rotation(), x2).astype(x.dtype)
        y = None
        for part in w.parts:
            xp = x2 if part.padded_in == n_in else jnp.pad(x2, ((0, 0), (0, part.padded_in - n_in)))
            yp = lut_matmul(xp, part.lut_weight(), impl=impl)
            y = yp if y is None else y + yp
        if w.rotation_out is not None:
            y = unrotate(w.rotation_out.rotation(), y).astype(x.dtype)
    else:
        if w.ndim != 2 or w.shape[1] != n_in:
            raise ValueError(f"weight of shape {w.shape} cannot multiply x of shape {x.shape}; expected (out, {n_in})")
        precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else lax.Precision.DEFAULT
        y = jnp.dot(x2, w.T.astype(x.dtype), precision=precision)
    return y.reshape(*lead, y.shape[-1])


def dense(w) -> jax.Array:
    """The float32 (out, in) matrix a weight stands for: W = linear(I, W)^T, through the same
    kernels a forward pass uses (a float array passes through as float32).

    Example:
        >>> import numpy as np
        >>> from vqlib.llm._weights import dense
        >>> dense(np.ones((4, 3))).shape
        (4, 3)
    """
    if not isinstance(w, LUTWeight | CompressedWeight):
        return jnp.asarray(w, jnp.float32)
    return linear(jnp.eye(w.shape[1], dtype=jnp.float32), w).T


def decode_rows(w, rows: jax.Array) -> jax.Array:
    """Rows `rows` (n,) of W as float32 (n, in): an embedding lookup that decodes only those rows."""
    if isinstance(w, LUTWeight):
        codebooks = w.codebooks[rows] if w.kind == "scalar" else w.codebooks
        return dense(dataclasses.replace(w, codes=w.codes[:, rows], codebooks=codebooks, scales=w.scales[rows]))
    if isinstance(w, CompressedWeight):
        if w.rotation_out is not None:
            raise ValueError("an embedding cannot have an output-side rotation: it mixes rows; compress it without one")
        n_in = w.shape[1]
        out = sum(dense(p.take_rows(rows).lut_weight())[:, :n_in] for p in w.parts)
        return out if w.rotation_in is None else unrotate(w.rotation_in.rotation(), out)
    return jnp.take(w, rows, axis=0).astype(jnp.float32)


def stored_bits(w) -> int:
    """Bits `w` occupies as stored: every leaf's bytes (codes, codebooks, scales, signs, floats)."""
    return 8 * sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(w))
