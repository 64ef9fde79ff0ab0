"""ADC scan with a fused top-k on TPU (Pallas, Mosaic TPU): the GPU kernel's block structure.

Grid (query tiles, code tiles), both parallel. Per step: the (m, block_q, kc) tables in VMEM, a
(block_n, m) tile of codes; each codebook's lookup is a one-hot matmul on the MXU, the scores
(block_q, block_n) stay in VMEM, and the tile's top k is written as candidates (k padded to a
multiple of 128 lanes); a final sort merges them. The bias travels as a lane-dense (1, n) row.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vqlib.kernels._adc_topk.common import check_dtypes, lookup_dot, merge_candidates, select_topk

MAX_K = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Queries per tile (a multiple of 8) and code rows per tile (a multiple of 128)."""

    block_q: int = 8
    block_n: int = 1024


def _adc_topk_kernel(tables_ref, codes_ref, bias_ref, dists_ref, ids_ref, *, n: int, k: int, precision):
    codes = codes_ref[...].astype(jnp.int32)  # (bn, m)
    s = None
    for j in range(codes.shape[1]):
        part = lookup_dot(tables_ref[j], codes[:, j : j + 1], precision)
        s = part if s is None else s + part
    rows = pl.program_id(1) * codes.shape[0] + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(rows < n, s + bias_ref[...], jnp.inf)
    dists_ref[...], ids_ref[...] = select_topk(s, rows, dists_ref.shape[1], k)


@functools.partial(jax.jit, static_argnames=("k", "block", "interpret"))
def adc_topk(
    tables: jax.Array,
    codes: jax.Array,
    k: int,
    bias: jax.Array | None = None,
    *,
    block: BlockSizes = BlockSizes(),
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Same contract as `adc_topk_reference`."""
    check_dtypes(tables, codes, "pallas_tpu")
    if k > MAX_K:
        raise NotImplementedError(f"pallas_tpu adc_topk selects at most {MAX_K} per query on chip, got k={k}")
    if block.block_q % 8 or block.block_n % 128:
        raise ValueError(f"BlockSizes needs block_q % 8 == 0 and block_n % 128 == 0, got {block}")
    q, m, _ = tables.shape
    n = codes.shape[0]
    bq = min(block.block_q, -(-q // 8) * 8)
    bn = min(block.block_n, -(-n // 128) * 128)
    slots = -(-k // 128) * 128
    tiles = -(-n // bn)
    tables_t = jnp.moveaxis(tables, 1, 0)  # (m, q, kc): one codebook's tables is a leading-axis load
    bias = (jnp.zeros((n,), jnp.float32) if bias is None else bias.astype(jnp.float32))[None, :]
    precision = lax.Precision.HIGHEST if tables.dtype == jnp.float32 else lax.Precision.DEFAULT
    from jax.experimental.pallas import tpu as pltpu

    params = None if interpret else pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    dists, ids = pl.pallas_call(
        functools.partial(_adc_topk_kernel, n=n, k=k, precision=precision),
        out_shape=(
            jax.ShapeDtypeStruct((q, tiles * slots), jnp.float32),
            jax.ShapeDtypeStruct((q, tiles * slots), jnp.int32),
        ),
        grid=(-(-q // bq), tiles),
        in_specs=[
            pl.BlockSpec((m, bq, tables_t.shape[2]), lambda i, t: (0, i, 0)),
            pl.BlockSpec((bn, m), lambda i, t: (t, 0)),
            pl.BlockSpec((1, bn), lambda i, t: (0, t)),
        ],
        out_specs=(pl.BlockSpec((bq, slots), lambda i, t: (i, t)), pl.BlockSpec((bq, slots), lambda i, t: (i, t))),
        compiler_params=params,
        interpret=interpret,
        name="vqlib_adc_topk",
    )(tables_t, codes, bias)
    return merge_candidates(dists, ids, k)
