"""Fused assignment on GPU (Pallas, Triton lowering): nothing N x K ever reaches HBM.

Grid: one program per tile of `block_n` points. A program loads its (block_n, d) points once and
loops over the centroids `block_k` at a time: a (block_n, block_k) score tile ||c||^2 - 2 x.c from
one dot on the tensor cores (16-bit inputs with float32 accumulation, or float32 at full
precision), then the tile's (min, lowest argmin) merged into a running pair held in registers.
Only (codes, distances) are written. Centroid norms are computed once per call, outside the loop.

Triton needs power-of-two tile shapes: d is zero-padded to a power of two (>= 16; zero columns
change no distance), k to a multiple of block_k with padding centroids that never win, and n to a
multiple of block_n (the padded rows are dropped). The measured good tiles on an H100 (see
GPU_NOTES) were 128-256 points x 64-128 centroids, 4-8 warps, 2-3 stages; on the H200 here see
`default_blocks`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vqlib.kernels._assign.common import FAR, centroid_norms, dot_dtype, merge, next_pow2, pad_to

MAX_D = 1024  # a (block_n, d) point tile must fit in registers / shared memory


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Points per program, centroids per loop step, Triton warps and pipeline stages."""

    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


def default_blocks(k: int) -> BlockSizes:
    """Tiles measured fastest on an H200 (jax 0.11.2, fp16/bf16, n = 1M, d = 128; benchmarks/RESULTS.md):
    k = 1,024: 64 x 64, 4 warps, 2 stages, 0.99 ms = 264 TFLOP/s (128 x 128 / 8 warps: 1.46 ms);
    k = 8,192: 128 x 64, 4 warps, 3 stages, 5.7-5.8 ms = 364-370 TFLOP/s (64 x 64: 345-359)."""
    return BlockSizes(block_n=64, block_k=64, num_warps=4, num_stages=2) if k <= 2048 else BlockSizes()


def _assign_kernel(x_ref, c_ref, cn_ref, codes_ref, dists_ref, *, block_k: int, precision):
    x = x_ref[...]  # (bn, dp): loaded once per program
    bn = x.shape[0]

    def step(j, carry):
        start = pl.multiple_of(j * block_k, block_k)
        c = c_ref[pl.ds(start, block_k), :]  # (bk, dp)
        dots = lax.dot_general(
            x, c, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )  # (bn, bk)
        scores = cn_ref[pl.ds(start, block_k)][None, :] - 2.0 * dots
        tile_best = jnp.min(scores, axis=1)
        columns = lax.broadcasted_iota(jnp.int32, scores.shape, 1)
        tile_arg = jnp.min(jnp.where(scores == tile_best[:, None], columns, block_k), axis=1) + start
        return merge(*carry, tile_best, tile_arg)

    init = (jnp.full((bn,), FAR, jnp.float32), jnp.zeros((bn,), jnp.int32))
    best, arg = lax.fori_loop(0, c_ref.shape[0] // block_k, step, init)
    x32 = x.astype(jnp.float32)
    codes_ref[...] = arg
    dists_ref[...] = jnp.maximum(best + jnp.sum(x32 * x32, axis=1), 0.0)


def _validate(x, centroids, block: BlockSizes):
    dtype = dot_dtype(x, centroids, "pallas_gpu")
    if x.shape[1] > MAX_D:
        raise NotImplementedError(
            f"pallas_gpu assign keeps a point tile on chip: d={x.shape[1]} > {MAX_D}; use impl='xla'"
        )
    for name in ("block_n", "block_k"):
        v = getattr(block, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"BlockSizes.{name} must be a power of two >= 16 (a Triton tile), got {v}")
    return dtype


@functools.partial(jax.jit, static_argnames=("block", "interpret"))
def assign(
    x: jax.Array, centroids: jax.Array, *, block: BlockSizes | None = None, interpret: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Same contract as `assign_reference`: (codes (n,) int32, squared distances (n,) float32);
    `block` defaults to `default_blocks(k)`."""
    block = default_blocks(centroids.shape[0]) if block is None else block
    dtype = _validate(x, centroids, block)
    n, d = x.shape
    k = centroids.shape[0]
    bn = min(block.block_n, next_pow2(n, 16))
    bk = min(block.block_k, next_pow2(k, 16))
    dp, np_, kp = next_pow2(d, 16), -(-n // bn) * bn, -(-k // bk) * bk
    xp = pad_to(x.astype(dtype), (np_, dp))
    c = centroids.astype(dtype)
    norms = centroid_norms(c, kp)
    cp = pad_to(c, (kp, dp))
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT
    codes, dists = pl.pallas_call(
        functools.partial(_assign_kernel, block_k=bk, precision=precision),
        out_shape=(jax.ShapeDtypeStruct((np_,), jnp.int32), jax.ShapeDtypeStruct((np_,), jnp.float32)),
        grid=(np_ // bn,),
        in_specs=[
            pl.BlockSpec((bn, dp), lambda i: (i, 0)),
            pl.BlockSpec((kp, dp), lambda i: (0, 0)),
            pl.BlockSpec((kp,), lambda i: (0,)),
        ],
        out_specs=(pl.BlockSpec((bn,), lambda i: (i,)), pl.BlockSpec((bn,), lambda i: (i,))),
        compiler_params=_compiler_params(block, interpret),
        interpret=interpret,
        name="vqlib_assign",
    )(xp, cp, norms)
    return codes[:n], dists[:n]


def _compiler_params(block: BlockSizes, interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages)
