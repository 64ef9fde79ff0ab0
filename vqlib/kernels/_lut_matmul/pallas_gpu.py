"""y = x @ W^T with W decoded tile by tile on chip (Pallas, Triton lowering); W never sits in HBM.

Column order trick: with v columns per code, x is split once (it is small) into v strided slices
x_p = x[:, p::v], and W_p = W[:, p::v] is a plain per-element lookup of the code tile, so
y = sum_p x_p @ W_p^T needs no reshapes on chip. Grid (batch tiles, output tiles); a program loops
over `block_in` code columns at a time: it loads the (block_out, block_in) code tile(s) once,
gathers the v decoded (block_out, block_in) tiles from the codebooks (small, cache-resident; the
gather is a pointer gather in Triton), and accumulates the v dots in float32 registers, in x's
dtype on the tensor cores. Per-row scales are applied once at the end.

Traffic per call: the codes (the compressed weight), the codebooks, x and y; at decode-time
batch (1-16) that is the whole cost, which is why this beats a dense bf16 matmul there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vqlib.kernels._lut_matmul.weight import LUTWeight


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tokens, output rows and code columns per step (powers of two; taken down to divide the shape)."""

    block_b: int = 16
    block_out: int = 64
    block_in: int = 64
    num_warps: int = 4
    num_stages: int = 2


def _pow2_divisor(v: int, cap: int) -> int:
    """Largest power of two <= cap dividing v."""
    return min(v & -v, cap)


def _decode_tiles(kind, codes, cb_ref, rows, cols, *, v, kc, groups, group):
    """The v decoded (bo, bj) float32 tiles W[rows, cols * v + p] (scales not applied)."""
    if kind == "scalar":
        return [cb_ref[(rows * (groups // group) + cols // group) * kc + codes[0]].astype(jnp.float32)]
    if kind == "vq":
        base = (cols % (cb_ref.shape[0] // (kc * v))) * kc if cb_ref.shape[0] > kc * v else 0
        return [cb_ref[(base + codes[0]) * v + p].astype(jnp.float32) for p in range(v)]
    if kind == "aq":
        return [sum(cb_ref[(i * kc + c) * v + p].astype(jnp.float32) for i, c in enumerate(codes)) for p in range(v)]
    # e8p: absolute values by pattern, signs from bits 1-7, coordinate 0's sign from the parity
    a = [cb_ref[(codes[0] >> 8) * 8 + p].astype(jnp.float32) for p in range(8)]
    neg = [(codes[0] >> p) & 1 for p in range(8)]
    # 2a is a whole number (a >= 0, a multiple of 1/2); + 0.5 then truncation, since Triton lowers no `round`
    twice = sum((2 * t + 0.5).astype(jnp.int32) for t in a)
    neg[0] = (twice // 2 - sum(neg[1:])) % 2
    shift = jnp.where((codes[0] & 1) == 1, 0.25, -0.25)
    return [(1 - 2 * neg[p]).astype(jnp.float32) * a[p] + shift for p in range(8)]


def _lut_matmul_kernel(x_ref, codes_ref, cb_ref, scales_ref, y_ref, *, kind, v, kc, group, block_in, precision):
    m, bo, groups = codes_ref.shape[0], codes_ref.shape[1], x_ref.shape[2]
    bb = x_ref.shape[1]
    rows = pl.program_id(1) * bo + lax.broadcasted_iota(jnp.int32, (bo, block_in), 0)

    def step(t, acc):
        start = pl.multiple_of(t * block_in, block_in)
        cols = start + lax.broadcasted_iota(jnp.int32, (bo, block_in), 1)
        codes = [codes_ref[i, :, pl.ds(start, block_in)].astype(jnp.int32) for i in range(m)]
        tiles = _decode_tiles(kind, codes, cb_ref, rows, cols, v=v, kc=kc, groups=groups, group=group)
        for p, w in enumerate(tiles):
            xp = x_ref[p, :, pl.ds(start, block_in)]  # (bb, bj)
            acc += lax.dot_general(
                xp,
                w.astype(xp.dtype),
                (((1,), (1,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )
        return acc

    acc = lax.fori_loop(0, groups // block_in, step, jnp.zeros((bb, bo), jnp.float32))
    y_ref[...] = (acc * scales_ref[...][None, :]).astype(y_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block", "interpret"))
def lut_matmul(x: jax.Array, weight: LUTWeight, *, block: BlockSizes = BlockSizes(), interpret: bool = False):
    """Same contract as `lut_matmul_reference`."""
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"pallas_gpu lut_matmul takes float32/bfloat16/float16 x, got {x.dtype}")
    m, out, groups = weight.codes.shape
    v = weight.vector_size
    bo, bj = _pow2_divisor(out, block.block_out), _pow2_divisor(groups, block.block_in)
    if bo < 16 or bj < 16:
        raise NotImplementedError(
            f"pallas_gpu lut_matmul needs out={out} and in // v={groups} divisible by 16 (tensor-core tiles); "
            "use impl='xla'"
        )
    b = x.shape[0]
    bb = min(block.block_b, max(16, 1 << (b - 1).bit_length()))
    bp = -(-b // bb) * bb
    xp = jnp.pad(x, ((0, bp - b), (0, 0))).reshape(bp, groups, v)
    xp = jnp.moveaxis(xp, 2, 0)  # (v, bp, in // v): x_p = x[:, p::v]; x is small
    cb = weight.codebooks.reshape(-1)
    kc = 256 if weight.kind == "e8p" else weight.codebooks.shape[-1 if weight.kind == "scalar" else -2]
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else lax.Precision.DEFAULT
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages)
    kernel = functools.partial(
        _lut_matmul_kernel, kind=weight.kind, v=v, kc=kc, group=weight.group, block_in=bj, precision=precision
    )
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((bp, out), x.dtype),
        grid=(bp // bb, out // bo),
        in_specs=[
            pl.BlockSpec((v, bb, groups), lambda i, o: (0, i, 0)),
            pl.BlockSpec((m, bo, groups), lambda i, o: (0, o, 0)),
            pl.BlockSpec(cb.shape, lambda i, o: (0,)),
            pl.BlockSpec((bo,), lambda i, o: (o,)),
        ],
        out_specs=pl.BlockSpec((bb, bo), lambda i, o: (i, o)),
        compiler_params=params,
        interpret=interpret,
        name="vqlib_lut_matmul",
    )(xp, weight.codes, cb, weight.scales)
    return y[:b]
