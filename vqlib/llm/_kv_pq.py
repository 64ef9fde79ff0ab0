"""PQ for the KV cache (MILLION-style): per-head product quantisation of keys and values.

Each head vector is cut into m sub-vectors of dsub = hd / m channels, each coded by the nearest
of k centroids of that head's codebook (fitted offline by `vqlib.codebooks.fit(x, "pq")` on
calibration keys and values of that layer and head; stored in float16). A key tile is scored
without decoding: the queries' inner-product tables (`vqlib.codebooks.adc_tables`, (m, k) per
query and head) are gathered at the codes and summed over the m sub-spaces. Value tiles are
decoded (a centroid gather) and mixed.

Channels are grouped into sub-spaces in an order fixed per codec: for keys, by default, each
sub-space holds RoPE planes (channel i with i + hd/2, which rotate together), so a sub-space's
distribution does not depend on position.

Bits per element: log2(k) / dsub; the default dsub = 2 and k = 2**(2 bits) give 2, 3 and 4
bits with m = hd / 2 (MILLION's 4-bit setting is m = 64 for hd = 128, k = 256).

References:
    Wang et al., "MILLION: mastering long-context LLM inference via outlier-immunized KV product
    quantization", DAC 2025 (arXiv 2504.03661).
    Jegou, Douze & Schmid, "Product quantization for nearest neighbor search", TPAMI 2011.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vqlib._types import pytree_dataclass, static_field
from vqlib.codebooks import ProductCodebook, adc_tables, fit, pack_codes, unpack_codes
from vqlib.llm._kv_engine import TileCodec, slice_positions, write_positions

_HIGHEST = lax.Precision.HIGHEST
# Tables are gathered per query row, sub-space and key: (m, g t, tile) numbers per head, against
# (tile, hd) decoded plus a (g t, tile, hd) product. They pay for decode steps (g t = a few rows);
# a prefill chunk or a perplexity window (g t in the thousands) decodes its key tiles instead
# (tables there: 0.6 GB per tile and layer on SmolLM2, and the process ran out of memory).
TABLE_ROWS = 16


def rope_pair_order(hd: int) -> tuple[int, ...]:
    """Channels i and i + hd/2 next to each other: 0, hd/2, 1, hd/2 + 1, ..."""
    half = hd // 2
    return tuple(int(c) for pair in zip(range(half), range(half, hd), strict=True) for c in pair)


@pytree_dataclass
class PQKVCodec(TileCodec):
    """Per-head PQ codes (see the module docstring).

    Attributes:
        centroids: per layer, (kvh, m, k, dsub) float16.
        order: channel order (a permutation of range(hd)) applied before cutting sub-spaces.
        tables: score keys by lookup tables in decode steps (at most TABLE_ROWS query rows per
            head; True) or always by decoding the tile (False); equal up to rounding.
    """

    centroids: tuple
    order: tuple = static_field(())
    tables: bool = static_field(True)

    @property
    def bits(self) -> int:
        return max(1, (self.centroids[0].shape[2] - 1).bit_length())

    @property
    def m(self) -> int:
        return self.centroids[0].shape[1]

    def init(self, batch, capacity, kvh, hd):
        return dict(codes=jnp.zeros((batch, capacity, kvh, -(-self.m * self.bits // 8)), jnp.uint8))

    def storage(self, kvh, hd):
        kvh_, m, k, dsub = self.centroids[0].shape
        return kvh * m * self.bits, float(kvh_ * m * k * dsub * 2)

    def _permute(self, x):
        return jnp.take(x, jnp.asarray(self.order, jnp.int32), axis=-1)

    def _unpermute(self, x):
        return jnp.take(x, jnp.asarray(np.argsort(self.order), jnp.int32), axis=-1)

    def write(self, layer, store, x, start, recent):
        b, t, kvh, hd = x.shape
        c = self.centroids[layer].astype(jnp.float32)  # (kvh, m, k, dsub)
        xs = self._permute(x).reshape(b, t, kvh, self.m, -1)
        dots = jnp.einsum("btkmd,kmcd->btkmc", xs, c, precision=_HIGHEST)
        d2 = jnp.sum(c * c, axis=-1)[None, None] - 2 * dots  # (b, t, kvh, m, k) minus ||x||^2
        codes = jnp.argmin(d2, axis=-1).astype(jnp.int32)
        return dict(codes=write_positions(store["codes"], pack_codes(codes, self.bits), start))

    def _codes(self, store, start, size):
        return unpack_codes(slice_positions(store["codes"], start, size), self.bits, self.m)

    def _decode_permuted(self, layer, codes):
        """(b, size, kvh, m) codes -> (b, size, kvh, hd) in the permuted channel order."""
        c = self.centroids[layer].astype(jnp.float32)
        kvh, m, k, dsub = c.shape
        flat = c.reshape(kvh * m * k, dsub)
        offsets = (jnp.arange(kvh, dtype=jnp.int32)[:, None] * m + jnp.arange(m, dtype=jnp.int32)[None, :]) * k
        rows = jnp.take(flat, codes + offsets[None, None], axis=0)  # (b, size, kvh, m, dsub)
        return rows.reshape(*codes.shape[:3], m * dsub)

    def dequant(self, layer, store, start, size):
        return self._unpermute(self._decode_permuted(layer, self._codes(store, start, size)))

    def prepare(self, layer, q):
        b, kvh, g, t, hd = q.shape
        if not self.tables or g * t > TABLE_ROWS:
            return q
        qh = self._permute(q).transpose(1, 0, 2, 3, 4).reshape(kvh, b * g * t, hd)
        c = self.centroids[layer].astype(jnp.float32)
        tables = jax.vmap(lambda ch, qq: adc_tables(ProductCodebook(ch), qq, metric="ip"))(c, qh)
        m, k = c.shape[1], c.shape[2]
        return tables.reshape(kvh, b, g * t, m, k).transpose(1, 0, 3, 2, 4), (g, t)  # (b, kvh, m, gt, k)

    def scores(self, layer, store, qstate, start, size):
        if not isinstance(qstate, tuple):  # decoded (see prepare)
            return TileCodec.scores(self, layer, store, qstate, start, size)
        tables, (g, t) = qstate
        codes = self._codes(store, start, size).transpose(0, 2, 3, 1)[:, :, :, None, :]  # (b, kvh, m, 1, size)
        b, kvh, m, gt, k = tables.shape
        picked = jnp.take_along_axis(tables, jnp.broadcast_to(codes, (b, kvh, m, gt, size)), axis=-1)
        return jnp.sum(picked, axis=2).reshape(b, kvh, g, t, size)

    def mix(self, layer, store, probs, start, size):
        x = self._decode_permuted(layer, self._codes(store, start, size))
        return jnp.einsum("bkgts,bskd->bkgtd", probs, x, precision=_HIGHEST)

    def finish(self, layer, acc, mass):
        return self._unpermute(acc)


def pq_shape(hd: int, bits: int, m: int | None, k: int | None) -> tuple[int, int]:
    """(m, k) for `bits` bits per element: dsub = 2 and k = 2**(2 bits) unless given."""
    if m is None:
        m = hd // 2
    if hd % m:
        raise ValueError(f"head_dim={hd} is not divisible by m={m} sub-spaces; pass an m that divides {hd}")
    if k is None:
        k = 2 ** round(bits * hd / m)
    if not 2 <= k <= 2**16:
        raise ValueError(f"k={k} centroids per sub-space is out of range [2, 65536]; pass a smaller bits or m")
    return m, k


def fit_pq_codec(key, samples, *, m: int, k: int, order, max_iter: int = 25) -> PQKVCodec:
    """Fits one PQ codebook per layer and head on samples: per layer, (n, kvh, hd) float32."""
    centroids = []
    order_idx = np.asarray(order)
    for layer, x in enumerate(samples):
        x = np.asarray(x, np.float32)[..., order_idx]
        if x.shape[0] < k:
            raise ValueError(f"{x.shape[0]} calibration vectors cannot fit k={k} centroids; pass more calibration")
        heads = []
        for h in range(x.shape[1]):
            sub = jax.random.fold_in(jax.random.fold_in(key, layer), h)
            heads.append(fit(x[:, h], "pq", key=sub, m=m, k=k, max_iter=max_iter).centroids)
        centroids.append(jnp.stack(heads).astype(jnp.float16))
    return PQKVCodec(tuple(centroids), order=tuple(int(i) for i in order))
