"""Fused assignment on TPU (Pallas, Mosaic TPU lowering): the block structure of the GPU kernel.

Grid (point tiles, centroid tiles), the centroid axis innermost and sequential ("arbitrary"):
each step scores a (block_k, block_n) tile as ||c||^2 - 2 c.x^T on the MXU (transposed, so that
the per-point minimum lies along lanes), and merges its (min, lowest argmin) into a running pair
kept in VMEM scratch; the last centroid step adds ||x||^2 and writes lane-dense (1, block_n)
rows of codes and distances. Nothing N x K reaches HBM; centroid norms are computed once per call.
n is padded to a multiple of block_n and k to a multiple of block_k (padding centroids never win);
d is taken whole.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vqlib.kernels._assign.common import FAR, centroid_norms, dot_dtype, merge, pad_to

MAX_D = 4096


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Points per tile (a multiple of 128: output lanes) and centroids per tile (a multiple of 8)."""

    block_n: int = 512
    block_k: int = 256


def _assign_kernel(x_ref, c_ref, cn_ref, codes_ref, dists_ref, best_ref, arg_ref, *, precision):
    j = pl.program_id(1)
    bk = c_ref.shape[0]

    @pl.when(j == 0)
    def _():
        best_ref[...] = jnp.full(best_ref.shape, FAR, jnp.float32)
        arg_ref[...] = jnp.zeros(arg_ref.shape, jnp.int32)

    x = x_ref[...]  # (bn, d)
    dots = lax.dot_general(
        c_ref[...], x, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )  # (bk, bn)
    scores = cn_ref[...] - 2.0 * dots  # (bk, 1) broadcast over lanes
    tile_best = jnp.min(scores, axis=0, keepdims=True)  # (1, bn)
    rows = lax.broadcasted_iota(jnp.int32, scores.shape, 0)
    tile_arg = jnp.min(jnp.where(scores == tile_best, rows, bk), axis=0, keepdims=True) + j * bk
    best, arg = merge(best_ref[...], arg_ref[...], tile_best, tile_arg)
    best_ref[...] = best
    arg_ref[...] = arg

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        x32 = x.astype(jnp.float32)
        ones = jnp.ones((1, x.shape[1]), jnp.float32)
        norms = lax.dot_general(
            ones,
            x32 * x32,
            (((1,), (1,)), ((), ())),
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )  # (1, bn)
        codes_ref[...] = arg
        dists_ref[...] = jnp.maximum(best + norms, 0.0)


@functools.partial(jax.jit, static_argnames=("block", "interpret"))
def assign(
    x: jax.Array, centroids: jax.Array, *, block: BlockSizes = BlockSizes(), interpret: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Same contract as `assign_reference`: (codes (n,) int32, squared distances (n,) float32)."""
    dtype = dot_dtype(x, centroids, "pallas_tpu")
    if x.shape[1] > MAX_D:
        raise NotImplementedError(f"pallas_tpu assign keeps a point tile in VMEM: d={x.shape[1]} > {MAX_D}")
    if block.block_n % 128 or block.block_k % 8:
        raise ValueError(f"BlockSizes needs block_n % 128 == 0 and block_k % 8 == 0, got {block}")
    n, d = x.shape
    k = centroids.shape[0]
    bn = min(block.block_n, -(-n // 128) * 128)
    bk = min(block.block_k, -(-k // 8) * 8)
    np_, kp = -(-n // bn) * bn, -(-k // bk) * bk
    xp = pad_to(x.astype(dtype), (np_, d))
    c = centroids.astype(dtype)
    norms = centroid_norms(c, kp)[:, None]
    cp = pad_to(c, (kp, d))
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT
    from jax.experimental.pallas import tpu as pltpu

    params = None if interpret else pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
    codes, dists = pl.pallas_call(
        functools.partial(_assign_kernel, precision=precision),
        out_shape=(jax.ShapeDtypeStruct((1, np_), jnp.int32), jax.ShapeDtypeStruct((1, np_), jnp.float32)),
        grid=(np_ // bn, kp // bk),
        in_specs=[
            pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
            pl.BlockSpec((bk, d), lambda i, j: (j, 0)),
            pl.BlockSpec((bk, 1), lambda i, j: (j, 0)),
        ],
        out_specs=(pl.BlockSpec((1, bn), lambda i, j: (0, i)), pl.BlockSpec((1, bn), lambda i, j: (0, i))),
        scratch_shapes=[pltpu.VMEM((1, bn), jnp.float32), pltpu.VMEM((1, bn), jnp.int32)],
        compiler_params=params,
        interpret=interpret,
        name="vqlib_assign",
    )(xp, cp, norms)
    return codes[0, :n], dists[0, :n]
