"""Tiled ADC top-k in plain XLA: score `block_n` code rows at a time, keep each tile's top k,
merge the candidates at the end. Memory O(q * block_n) beyond inputs and outputs."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from vqlib.kernels._adc_topk.common import merge_candidates
from vqlib.kernels._adc_topk.reference import adc_scores


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Code rows scored per step."""

    block_n: int = 65536


@functools.partial(jax.jit, static_argnames=("k", "block"))
def adc_topk(
    tables: jax.Array, codes: jax.Array, k: int, bias: jax.Array | None = None, *, block: BlockSizes = BlockSizes()
) -> tuple[jax.Array, jax.Array]:
    """Same contract as `adc_topk_reference`."""
    n = codes.shape[0]
    bn = max(min(block.block_n, n), k)
    if bn >= n:
        neg, ids = lax.top_k(-adc_scores(tables, codes, bias), k)
        return -neg, ids.astype(jnp.int32)
    tiles = -(-n // bn)
    pad = tiles * bn - n
    codes_t = jnp.pad(codes, ((0, pad), (0, 0))).reshape(tiles, bn, codes.shape[1])
    bias_t = jnp.pad(jnp.zeros((n,), jnp.float32) if bias is None else bias.astype(jnp.float32), (0, pad))
    bias_t = bias_t.reshape(tiles, bn)

    def one_tile(args):
        t, tile_codes, tile_bias = args
        rows = t * bn + jnp.arange(bn, dtype=jnp.int32)
        s = jnp.where((rows < n)[None, :], adc_scores(tables, tile_codes, tile_bias), jnp.inf)
        neg, local = lax.top_k(-s, k)
        return -neg, jnp.take(rows, local)

    dists, ids = lax.map(one_tile, (jnp.arange(tiles, dtype=jnp.int32), codes_t, bias_t))  # (tiles, q, k)
    q = tables.shape[0]
    return merge_candidates(jnp.moveaxis(dists, 0, 1).reshape(q, -1), jnp.moveaxis(ids, 0, 1).reshape(q, -1), k)
