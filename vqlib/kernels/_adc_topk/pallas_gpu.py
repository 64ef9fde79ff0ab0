"""ADC scan with a fused top-k on GPU (Pallas, Triton lowering); the codes are streamed once.

Grid (query tiles, code tiles). A program holds `block_q` queries' tables, (m, block_q, kc), on
chip and scores one tile of `block_n` code rows: for each codebook j, table_j[:, codes[:, j]] is a
(block_q, kc) x (kc, block_n) matmul against the one-hot of the codes (exact, on the tensor
cores, so no gather is needed), summed in float32 registers, plus the row bias. The tile's own
top k (k rounds of min / lowest-row argmin / mask) is written as (block_q, k) candidates; a
final sort over the n / block_n candidate sets per query gives the answer. HBM traffic: the
codes once per query tile, the tables, and q * k * n / block_n candidates; never q x n scores.

kc is padded to a power of two (Triton tile shapes); n and q need not be block multiples: the
last tiles are masked.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vqlib.kernels._adc_topk.common import check_dtypes, lookup_dot, merge_candidates, select_topk

MAX_K = 256  # results per query: the per-tile selection is k rounds over the tile


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Queries and code rows per program (powers of two), Triton warps and stages."""

    block_q: int = 16
    block_n: int = 512
    num_warps: int = 4
    num_stages: int = 2
    # "gather": table loads by code (measured on an H200: 1M codes x 16 bytes, 1,000 queries, k = 10,
    # 20.8 ms at 16 x 512, 54 ms at 64 x 256, 207 ms at 128 x 256); "onehot": one-hot matmuls on the
    # matrix units, 2 kc more arithmetic, for small kc
    lookup: str = "gather"


ONEHOT_TILE = 32768  # block_n * kc entries of the one-hot tile: 128 x 256 compiled on an H200; 512 x 256 failed


def _pow2(v: int, low: int = 1) -> int:
    return max(low, 1 << (max(v, 1) - 1).bit_length())


def _adc_topk_kernel(tables_ref, codes_ref, bias_ref, dists_ref, ids_ref, *, n: int, k: int, precision):
    m = tables_ref.shape[0]
    s = None
    for j in range(m):
        part = lookup_dot(tables_ref[j], codes_ref[:, j].astype(jnp.int32)[:, None], precision)
        s = part if s is None else s + part
    _finish(s, bias_ref, dists_ref, ids_ref, n=n, k=k)


def _adc_gather_kernel(tables_ref, codes_ref, bias_ref, dists_ref, ids_ref, *, n: int, k: int, m: int, kc: int):
    """tables_ref: the whole (q' * m * kc,) flattened tables (cache-resident); one gather per codebook."""
    bq = dists_ref.shape[0]
    queries = pl.program_id(0) * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    s = None
    for j in range(m):
        # rows past n hold whatever the masked load gave (negative for int32 codes): clamped into
        # the table, or the gather reads outside it (an illegal address, seen on an H200)
        column = jnp.clip(codes_ref[:, j].astype(jnp.int32), 0, kc - 1)[None, :]  # (1, bn)
        part = tables_ref[(queries * m + j) * kc + column].astype(jnp.float32)  # (bq, bn)
        s = part if s is None else s + part
    _finish(s, bias_ref, dists_ref, ids_ref, n=n, k=k)


def _finish(s, bias_ref, dists_ref, ids_ref, *, n: int, k: int):
    bn = s.shape[1]
    rows = pl.program_id(1) * bn + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(rows < n, s + bias_ref[...][None, :], jnp.inf)
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
    check_dtypes(tables, codes, "pallas_gpu")
    if block.lookup not in ("onehot", "gather"):
        raise ValueError(f"BlockSizes.lookup must be 'onehot' or 'gather', got {block.lookup!r}")
    if k > MAX_K:
        raise NotImplementedError(f"pallas_gpu adc_topk selects at most {MAX_K} per query on chip, got k={k}")
    q, m, kc = tables.shape
    n = codes.shape[0]
    bq = min(block.block_q, _pow2(q, 16))
    bn = max(min(block.block_n, _pow2(n, 16)), _pow2(k))
    if block.lookup == "onehot" and not interpret and bn * _pow2(kc) > ONEHOT_TILE:
        raise NotImplementedError(
            f"pallas_gpu adc_topk's one-hot tile block_n x kc must stay <= {ONEHOT_TILE} entries "
            f"(got {bn} x {_pow2(kc)}); lower block_n or use lookup='gather'"
        )
    slots = _pow2(k)
    tiles = -(-n // bn)
    qp = -(-q // bq) * bq
    bias = jnp.zeros((n,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    precision = lax.Precision.HIGHEST if tables.dtype == jnp.float32 else lax.Precision.DEFAULT
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages)
    if block.lookup == "gather":
        flat = jnp.pad(tables, ((0, qp - q), (0, 0), (0, 0))).reshape(-1)  # (q' m kc,): rows of padding queries
        kernel = functools.partial(_adc_gather_kernel, n=n, k=k, m=m, kc=kc)
        table_spec = pl.BlockSpec(flat.shape, lambda i, t: (0,))
    else:
        flat = jnp.pad(jnp.moveaxis(tables, 1, 0), ((0, 0), (0, 0), (0, _pow2(kc) - kc)))  # (m, q, kc'), small
        kernel = functools.partial(_adc_topk_kernel, n=n, k=k, precision=precision)
        table_spec = pl.BlockSpec((m, bq, flat.shape[2]), lambda i, t: (0, i, 0))
    dists, ids = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((qp, tiles * slots), jnp.float32),
            jax.ShapeDtypeStruct((qp, tiles * slots), jnp.int32),
        ),
        grid=(qp // bq, tiles),
        in_specs=[
            table_spec,
            pl.BlockSpec((bn, m), lambda i, t: (t, 0)),
            pl.BlockSpec((bn,), lambda i, t: (t,)),
        ],
        out_specs=(pl.BlockSpec((bq, slots), lambda i, t: (i, t)), pl.BlockSpec((bq, slots), lambda i, t: (i, t))),
        compiler_params=params,
        interpret=interpret,
        name="vqlib_adc_topk",
    )(flat, codes, bias)
    dists, ids = dists[:q], ids[:q]
    return merge_candidates(dists, ids, k)
