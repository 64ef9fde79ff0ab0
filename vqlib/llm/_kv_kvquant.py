"""KVQuant-style codes: keys per channel before RoPE, non-uniform levels, dense-and-sparse outliers.

Keys are coded before RoPE (the cache undoes RoPE on write and applies it to every decoded
tile): channel c of a key is replaced by the nearest of its own 2**b levels, fitted offline by
1-D k-means on calibration keys of that channel weighted by their sensitivity (the squared loss
gradient, the diagonal Fisher information). Values are coded per token: each head vector is
scaled to [-1, 1] by its own float16 (centre, half-range) and replaced by the nearest of the
layer's 2**b levels, fitted the same way on scaled calibration values.

Dense-and-sparse: in each token, the `n_out` numbers (over all heads of the layer; about 1%)
farthest outside the inlier range are stored exactly beside the codes (value and index) and
restored after decoding; the dense part is coded without them. Keys' range is per channel
(offline thresholds at the outlier fraction's quantiles), values' per token (the largest
magnitudes are the outliers, the rest sets the token's scale). The cache keeps the first token in
full precision (the attention sink).

References:
    Hooper et al., "KVQuant: towards 10 million context length LLM inference with KV cache
    quantization", NeurIPS 2024 (arXiv 2401.18079).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vqlib._types import pytree_dataclass, static_field
from vqlib.codebooks import fit_kmeans_batched, pack_codes, unpack_codes
from vqlib.llm._config import LlamaConfig
from vqlib.llm._kv_engine import TileCodec, slice_positions, write_positions
from vqlib.llm._kv_rope import RopeTable, rope_at

BITS = (3, 4)


def _nearest(levels, x):
    """Index of the nearest of the sorted levels (..., L), broadcast against x (...)."""
    mid = (levels[..., 1:] + levels[..., :-1]) / 2
    return jnp.sum(x[..., None] > mid, axis=-1).astype(jnp.int32)


def _restore(x, idx, val):
    """x (b, s, kvh, hd) with the sparse outliers (b, s, n) written back at flat indices idx
    (a scatter: 7x faster per 512-position tile of SmolLM2 than the one-hot select over kvh * hd
    it replaced)."""
    b, s, kvh, hd = x.shape
    rows = jnp.arange(b, dtype=jnp.int32)[:, None, None]
    positions = jnp.arange(s, dtype=jnp.int32)[None, :, None]
    flat = x.reshape(b, s, kvh * hd).at[rows, positions, idx.astype(jnp.int32)].set(val.astype(jnp.float32))
    return flat.reshape(b, s, kvh, hd)


def _index_dtype(n: int):
    return jnp.uint8 if n <= 256 else jnp.uint16


@pytree_dataclass
class KVQuantKeyCodec(TileCodec):
    """Keys before RoPE, per-channel levels, per-channel outlier thresholds.

    Attributes:
        levels: per layer, (kvh, hd, 2**bits) float16 sorted levels of each channel.
        low, high: per layer, (kvh, hd) float32 inlier range of each channel.
        rope_table: the angles of every position of the cache holding the codec (None outside a
            cache: then computed from config).
        config: the model's config (RoPE).
        num_outliers: numbers per token kept exactly.
        outlier_dtype: "float16" or "float32".
    """

    levels: tuple
    low: tuple
    high: tuple
    rope_table: RopeTable | None = None
    config: LlamaConfig = static_field(None)
    num_outliers: int = static_field(2)
    outlier_dtype: str = static_field("float16")

    @property
    def bits(self) -> int:
        return _level_bits(self.levels)

    def init(self, batch, capacity, kvh, hd):
        codes = jnp.zeros((batch, capacity, kvh, -(-hd * self.bits // 8)), jnp.uint8)
        return dict(codes=codes, **_outlier_store(self, batch, capacity, kvh * hd))

    def storage(self, kvh, hd):
        bits = kvh * hd * self.bits + _outlier_bits(self, kvh * hd)
        fixed = kvh * hd * (2**self.bits * 2 + 2 * 4)  # float16 levels, float32 thresholds
        return bits, float(fixed)

    def write(self, layer, store, x, start, recent):
        b, t, kvh, hd = x.shape
        x = rope_at(self.rope_table, self.config, x, start, inverse=True)
        lo, hi = self.low[layer][None, None], self.high[layer][None, None]
        excess = jnp.maximum(x - hi, lo - x) / (hi - lo)  # > 0 outside the inlier range
        _, idx = jax.lax.top_k(excess.reshape(b, t, kvh * hd), self.num_outliers)
        val = jnp.take_along_axis(x.reshape(b, t, kvh * hd), idx, axis=-1)
        codes = _nearest(self.levels[layer].astype(jnp.float32)[None, None], x)
        codes = write_positions(store["codes"], pack_codes(codes, self.bits), start)
        return dict(codes=codes, **_write_outliers(store, idx, val, start))

    def dequant_pre_rope(self, layer, store, start, size):
        levels = self.levels[layer].astype(jnp.float32)
        hd = levels.shape[1]
        codes = unpack_codes(slice_positions(store["codes"], start, size), self.bits, hd)
        table = jnp.broadcast_to(levels[None, None], (*codes.shape, levels.shape[-1]))
        x = jnp.take_along_axis(table, codes[..., None], -1)
        return _read_outliers(x[..., 0], store, start, size)

    def dequant(self, layer, store, start, size):
        return rope_at(self.rope_table, self.config, self.dequant_pre_rope(layer, store, start, size), start)

    def for_capacity(self, capacity):
        return dataclasses.replace(self, rope_table=RopeTable.build(self.config, capacity))


@pytree_dataclass
class KVQuantValueCodec(TileCodec):
    """Values per token: (centre, half-range) scaling, per-layer levels, per-token outliers.

    Attributes:
        levels: per layer, (2**bits,) float16 sorted levels in [-1, 1].
        head_dim: channels per head.
        num_outliers: numbers per token kept exactly (the largest magnitudes).
        outlier_dtype: "float16" or "float32".
    """

    levels: tuple
    head_dim: int = static_field(0)
    num_outliers: int = static_field(2)
    outlier_dtype: str = static_field("float16")

    @property
    def bits(self) -> int:
        return _level_bits(self.levels)

    def init(self, batch, capacity, kvh, hd):
        return dict(
            codes=jnp.zeros((batch, capacity, kvh, -(-hd * self.bits // 8)), jnp.uint8),
            centre=jnp.zeros((batch, capacity, kvh), jnp.float16),
            scale=jnp.zeros((batch, capacity, kvh), jnp.float16),
            **_outlier_store(self, batch, capacity, kvh * hd),
        )

    def storage(self, kvh, hd):
        bits = kvh * (hd * self.bits + 32) + _outlier_bits(self, kvh * hd)
        return bits, float(2**self.bits * 2)

    def write(self, layer, store, x, start, recent):
        b, t, kvh, hd = x.shape
        centre, scale, idx, val = split_outliers(x, self.num_outliers)
        centre16, scale16 = centre.astype(jnp.float16), scale.astype(jnp.float16)
        unit = (x - centre16.astype(jnp.float32)[..., None]) / _safe(scale16.astype(jnp.float32))[..., None]
        codes = _nearest(self.levels[layer].astype(jnp.float32).reshape(1, 1, 1, 1, -1), unit)
        return dict(
            codes=write_positions(store["codes"], pack_codes(codes, self.bits), start),
            centre=write_positions(store["centre"], centre16, start),
            scale=write_positions(store["scale"], scale16, start),
            **_write_outliers(store, idx, val, start),
        )

    def dequant(self, layer, store, start, size):
        levels = self.levels[layer].astype(jnp.float32)
        centre = slice_positions(store["centre"], start, size).astype(jnp.float32)
        scale = slice_positions(store["scale"], start, size).astype(jnp.float32)
        codes = unpack_codes(slice_positions(store["codes"], start, size), self.bits, self.head_dim)
        x = jnp.take(levels, codes) * scale[..., None] + centre[..., None]
        return _read_outliers(x, store, start, size)


def _level_bits(levels: tuple) -> int:
    """Bits of a code that indexes 2**bits sorted levels."""
    return (levels[0].shape[-1] - 1).bit_length()


def _outlier_store(codec, batch: int, capacity: int, width: int) -> dict:
    """Zeroed per-token outliers: `codec.num_outliers` values and their flat indices into `width` numbers."""
    shape = (batch, capacity, codec.num_outliers)
    return dict(
        out_value=jnp.zeros(shape, jnp.dtype(codec.outlier_dtype)), out_index=jnp.zeros(shape, _index_dtype(width))
    )


def _outlier_bits(codec, width: int) -> int:
    """Bits per token of the outliers: each value and its index into `width` numbers."""
    index_bits = 8 * jnp.dtype(_index_dtype(width)).itemsize
    return codec.num_outliers * (8 * jnp.dtype(codec.outlier_dtype).itemsize + index_bits)


def _write_outliers(store: dict, idx, val, start) -> dict:
    return dict(
        out_value=write_positions(store["out_value"], val, start),
        out_index=write_positions(store["out_index"], idx, start),
    )


def _read_outliers(x, store: dict, start, size):
    """x with the stored outliers of positions [start, start + size) put back exactly."""
    idx = slice_positions(store["out_index"], start, size)
    return _restore(x, idx, slice_positions(store["out_value"], start, size))


def _safe(scale):
    return jnp.where(scale > 0, scale, 1.0)


def split_outliers(x, n: int):
    """Per token: the n largest magnitudes over all heads (flat indices and values), and each head's
    (centre, half-range) of the other numbers."""
    b, t, kvh, hd = x.shape
    flat = x.reshape(b, t, kvh * hd)
    _, idx = jax.lax.top_k(jnp.abs(flat), n)
    val = jnp.take_along_axis(flat, idx, axis=-1)
    every = jnp.arange(kvh * hd, dtype=jnp.int32).reshape(1, 1, 1, -1)
    is_out = jnp.any(idx[..., None] == every, axis=2).reshape(b, t, kvh, hd)
    hi = jnp.max(jnp.where(is_out, -jnp.inf, x), axis=-1)
    lo = jnp.min(jnp.where(is_out, jnp.inf, x), axis=-1)
    hi, lo = jnp.where(jnp.isfinite(hi), hi, 0.0), jnp.where(jnp.isfinite(lo), lo, 0.0)
    return (hi + lo) / 2, (hi - lo) / 2, idx, val


# ----------------------------------------------------------------------------- fitting


def _weighted_levels(key, xs, weights, num_levels: int):
    """Sorted 1-D k-means levels per problem: xs, weights (p, n) -> (p, num_levels)."""
    cb = fit_kmeans_batched(key, xs[..., None], k=num_levels, sample_weight=weights, max_iter=50)
    return jnp.sort(cb.centroids[..., 0], axis=-1)


def fit_kvquant_codecs(
    key,
    config: LlamaConfig,
    keys_pre_rope,
    values,
    key_weights,
    value_weights,
    *,
    bits: int,
    num_outliers: int,
    outlier_dtype: str = "float16",
    max_samples: int = 65536,
):
    """Fits both codecs on calibration activations: per layer, keys before RoPE and values
    (n, kvh, hd) with their sensitivity weights (same shapes; all ones for plain k-means)."""
    kvh, hd = config.num_kv_heads, config.head_dim
    fraction = num_outliers / (kvh * hd)
    rng = np.random.default_rng(0)
    levels_k, lows, highs, levels_v = [], [], [], []
    for layer in range(config.num_layers):
        sub = jax.random.fold_in(key, layer)
        x = np.asarray(keys_pre_rope[layer], np.float32).reshape(-1, kvh * hd)
        w = np.asarray(key_weights[layer], np.float32).reshape(-1, kvh * hd)
        lo = np.quantile(x, fraction / 2, axis=0)
        hi = np.quantile(x, 1 - fraction / 2, axis=0)
        hi = np.where(hi > lo, hi, lo + 1e-6)
        inlier = (x >= lo) & (x <= hi)
        w = np.where(inlier, w, 0.0) + 1e-12 * inlier  # outliers do not pull the levels
        keep = rng.permutation(len(x))[:max_samples]
        levels = _weighted_levels(sub, jnp.asarray(x[keep].T), jnp.asarray(w[keep].T), 2**bits)
        levels_k.append(levels.reshape(kvh, hd, -1).astype(jnp.float16))
        lows.append(jnp.asarray(lo.reshape(kvh, hd), jnp.float32))
        highs.append(jnp.asarray(hi.reshape(kvh, hd), jnp.float32))

        v = jnp.asarray(values[layer], jnp.float32)[None]  # (1, n, kvh, hd)
        centre, scale, idx, _ = split_outliers(v, num_outliers)
        unit = np.asarray((v - centre[..., None]) / _safe(scale)[..., None])[0]
        wv = np.asarray(value_weights[layer], np.float32) * np.asarray(scale[0, ..., None]) ** 2
        is_out = np.zeros(unit.shape[0] * kvh * hd, bool)
        flat_idx = np.asarray(idx[0]) + (np.arange(unit.shape[0]) * kvh * hd)[:, None]
        is_out[flat_idx.reshape(-1)] = True
        u, wu = unit.reshape(-1)[~is_out], wv.reshape(-1)[~is_out]
        keep = rng.permutation(len(u))[:max_samples]
        u, wu = jnp.asarray(u[keep][None]), jnp.asarray(wu[keep][None])
        levels_v.append(_weighted_levels(jax.random.fold_in(sub, 1), u, wu, 2**bits)[0].astype(jnp.float16))
    key_codec = KVQuantKeyCodec(
        tuple(levels_k), tuple(lows), tuple(highs), config=config, num_outliers=num_outliers,
        outlier_dtype=outlier_dtype,
    )  # fmt: skip
    value_codec = KVQuantValueCodec(
        tuple(levels_v), head_dim=hd, num_outliers=num_outliers, outlier_dtype=outlier_dtype
    )
    return key_codec, value_codec
