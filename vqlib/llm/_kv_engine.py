"""The compressed KV cache: codes for every position, attention read a tile at a time.

`CompressedKVCache` implements the decoder's cache interface (`vqlib.llm._kv_cache`) for any pair
of codecs, one for keys and one for values (KIVI, KVQuant, TurboQuant, PQ: `_kv_*.py`). A codec
turns the new tokens' vectors into codes as they arrive (`write`) and reads them back inside the
attention (`scores` for keys, `mix` for values), one tile of positions at a time, so the
attention never holds a float copy of the stored sequence: the float32 scratch is one tile.

Semantics: `attend` with t new tokens is t one-token decode steps. Token p's key and value enter
the cache before its own attention, and query p sees key / value s <= p as the cache would hold
it at step p: in full precision when the cache's window rule keeps it so, else as the codec
decodes it. So a prefill of n tokens equals n decode steps (up to float rounding), and a
perplexity window scored in one call equals its token-by-token decoding.

Window rules (`R` = `window`, positions s of a query p):
    "block"    s >= R * floor(p / R)   KIVI's keys: full precision until the R-token buffer fills,
                                        then flushed to codes in one go (R a multiple of the group)
    "sliding"  s >= p - R              KIVI's values: each token leaves the window R steps later
    "none"     never
plus `sink`: the first `sink` positions always in full precision (KVQuant's first token).

Attention of the t queries at positions length .. length + t - 1 reads three sources, joined by
one online softmax (running max and sum, as in flash attention):
    A: codes of positions [sink, a_end), a_end = max(length - W, 0), in tiles of `tile`
       positions; the number of tiles follows `length` (a while loop), so one compilation serves
       every length and a decode step costs what the stored tokens cost;
    B: positions [a_end, length + t): the last W stored and the t new ones, each scored from its
       codes or from the full-precision buffer as the window rule says, per query;
    C: the sink positions, full precision.
W (`window_slots`) is the size of the full-precision buffer of the last positions, at least what
the rules need.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from vqlib._types import pytree_dataclass, static_field
from vqlib.llm._config import LlamaConfig

_HIGHEST = lax.Precision.HIGHEST
_NEG = float(jnp.finfo(jnp.float32).min)
RULES = ("block", "sliding", "none")
READS = ("auto", "tiles")


# ----------------------------------------------------------------------------- codec base


class TileCodec:
    """Default tile reads for codecs that dequantise: `scores` and `mix` through `dequant`.

    A codec is a pytree dataclass (its fitted parameters are leaves, per layer in tuples) with:
        init(batch, capacity, kvh, hd) -> the store of one layer (pytree, leading axes (b, capacity))
        write(layer, store, x, start, recent) -> store with x (b, t, kvh, hd) coded at positions
            start .. start + t - 1; `recent` (b, W + t, kvh, hd) is the full-precision context of
            positions start - W .. start + t - 1 (W = the cache's window_slots; zeros before 0)
        dequant(layer, store, start, size) -> (b, size, kvh, hd) float32 of positions start ..
        prepare(layer, q) -> query state, q (b, kvh, g, t, hd) float32 already scaled by 1/sqrt(hd)
        scores(layer, store, qstate, start, size) -> (b, kvh, g, t, size) q . k of those positions
        mix(layer, store, probs, start, size) -> (b, kvh, g, t, e) sum of probs * values, in the
            codec's own domain (e = hd unless the codec accumulates e.g. rotated vectors)
        finish(layer, acc, mass) -> (b, kvh, g, t, hd): acc back to the model's domain; mass
            (b, kvh, g, t) is the probability the codec received
        storage(kvh, hd) -> (bits per token per layer, bytes per layer independent of length)
    """

    def prepare(self, layer: int, q):
        return q

    def scores(self, layer: int, store, q, start, size: int):
        x = self.dequant(layer, store, start, size)
        return jnp.einsum("bkgtd,bskd->bkgts", q, x, precision=_HIGHEST)

    def mix(self, layer: int, store, probs, start, size: int):
        x = self.dequant(layer, store, start, size)
        return jnp.einsum("bkgts,bskd->bkgtd", probs, x, precision=_HIGHEST)

    def finish(self, layer: int, acc, mass):
        return acc

    def native_reader(self, value_codec, head_dim: int):
        """None, or a function (key store, value store, q (b, kvh, r, hd), lo, hi) -> (m, den, acc)
        reading positions [lo, hi) in one native kernel call where this key codec and
        `value_codec` have one on this device (what the tile loop computes, as `_online` does)."""
        return None

    def acc_dim(self, hd: int) -> int:
        """Width of `mix`'s accumulator."""
        return hd

    @property
    def padding(self) -> int:
        """Positions a write may touch past length + t (whole groups of a per-group codec)."""
        return 0

    def for_capacity(self, capacity: int):
        """The codec as a cache of `capacity` positions holds it (a codec that decodes keys
        before RoPE takes the cache's table of angles here)."""
        return self


def slice_positions(a, start, size: int):
    """a[:, start:start + size] along axis 1 (the position axis of every store array)."""
    return lax.dynamic_slice_in_dim(a, start, size, axis=1)


def write_positions(a, update, start):
    """a with a[:, start:start + t] = update (cast to a's dtype)."""
    return lax.dynamic_update_slice_in_dim(a, update.astype(a.dtype), start, axis=1)


def replace_layer(items: tuple, layer: int, value) -> tuple:
    return (*items[:layer], value, *items[layer + 1 :])


def window_fp(rule: str, window: int, s, p):
    """(t, n) bool: position s (n,) is read in full precision by query p (t,) under the rule."""
    s, p = s[None, :], p[:, None]
    if rule == "block":
        return s >= window * (p // window)
    if rule == "sliding":
        return s >= p - window
    return jnp.zeros(jnp.broadcast_shapes(s.shape, p.shape), bool)


# ----------------------------------------------------------------------------- the cache


@pytree_dataclass
class CompressedKVCache:
    """A KV cache storing codes (see the module docstring); build it with `vqlib.llm.make_cache`.

    Attributes:
        key_codec, value_codec: the codecs with their fitted parameters.
        keys, values: per layer, the codec's store (codes and side data for `capacity` positions).
        recent_keys, recent_values: per layer, (b, W, kvh, hd) full precision of positions
            length - W .. length - 1 (empty tuples when W = 0).
        sink_keys, sink_values: per layer, (b, sink, kvh, hd) (empty tuples when sink = 0).
        length: () int32, tokens stored so far.
        config: the LlamaConfig the cache was built for.
        max_len: capacity in tokens.
        method: the method name ("kivi", "kvquant", "turboquant", "pq").
        key_rule, value_rule: "block", "sliding" or "none"; key_window, value_window: their R.
        window_slots: W, the full-precision buffer length (recent_keys is kept when key_rule is
            not "none", recent_values when value_rule is not "none").
        sink: positions always kept in full precision at the start.
        tile: positions per tile of the attention's read of the codes.
        read: "auto" (a native kernel reads the codes where the codecs have one on this device,
            `TileCodec.native_reader`; else the tile loop) or "tiles" (always the tile loop).
        window_dtype: "float16" or "float32", how the window and sink are stored.
        description: (name, value) pairs describing the settings (for reports).
    """

    key_codec: Any
    value_codec: Any
    keys: tuple
    values: tuple
    recent_keys: tuple
    recent_values: tuple
    sink_keys: tuple
    sink_values: tuple
    length: jax.Array
    config: LlamaConfig = static_field()
    max_len: int = static_field()
    method: str = static_field("")
    key_rule: str = static_field("none")
    key_window: int = static_field(0)
    value_rule: str = static_field("none")
    value_window: int = static_field(0)
    window_slots: int = static_field(0)
    sink: int = static_field(0)
    tile: int = static_field(512)
    read: str = static_field("auto")
    window_dtype: str = static_field("float16")
    description: tuple = static_field(())

    # ------------------------------------------------------------------ interface

    def attend(self, layer: int, q, k, v):
        """Stores the t new tokens' k, v (b, t, kvh, hd) and returns their attention (b, t, h, hd)."""
        self._check_inputs(layer, q, k, v)
        b, t, h, hd = q.shape
        kvh = k.shape[2]
        g = h // kvh
        length = self.length
        q_pos = length + jnp.arange(t, dtype=jnp.int32)
        k, v = k.astype(jnp.float32), v.astype(jnp.float32)
        W, S = self.window_slots, self.sink
        kc, vc = self.key_codec, self.value_codec

        # full-precision context: the stored window, then the new tokens as the window stores them
        # (so a token reads the same numbers whether it arrived in this call or an earlier one)
        zeros = jnp.zeros((b, W, kvh, hd), jnp.float32)
        old_k = self.recent_keys[layer].astype(jnp.float32) if self.recent_keys else zeros
        old_v = self.recent_values[layer].astype(jnp.float32) if self.recent_values else zeros
        as_stored = lambda x: x.astype(self.window_dtype).astype(jnp.float32)  # noqa: E731
        recent_k = jnp.concatenate([old_k, as_stored(k)], axis=1)
        recent_v = jnp.concatenate([old_v, as_stored(v)], axis=1)
        kstore = kc.write(layer, self.keys[layer], k, length, recent_k)
        vstore = vc.write(layer, self.values[layer], v, length, recent_v)

        qs = q.astype(jnp.float32).reshape(b, t, kvh, g, hd).transpose(0, 2, 3, 1, 4) * jnp.float32(hd**-0.5)
        qstate = kc.prepare(layer, qs)
        stats = (
            jnp.full((b, kvh, g, t), _NEG, jnp.float32),  # running max
            jnp.zeros((b, kvh, g, t), jnp.float32),  # running sum of exp
            jnp.zeros((b, kvh, g, t), jnp.float32),  # the part of the sum the value codec holds
        )
        acc_codec = None
        a_end = jnp.maximum(length - W, 0)

        # A: codes of [sink, a_end), tile by tile
        tile = self.tile

        def body(i, carry):
            (m, den, lq), acc = carry
            start = i * tile
            pos = start + jnp.arange(tile, dtype=jnp.int32)
            keep = ((pos >= S) & (pos < a_end))[None, :]  # (1, tile): every query sees all of A
            s = kc.scores(layer, kstore, qstate, start, tile)
            (m, den, lq), p, corr = _online(m, den, lq, s, keep, None)
            acc = acc * corr[..., None] + vc.mix(layer, vstore, p, start, tile)
            return (m, den, lq), acc

        reader = kc.native_reader(vc, hd) if self.read == "auto" else None
        if reader is None:
            acc0 = jnp.zeros((b, kvh, g, t, vc.acc_dim(hd)), jnp.float32)
            num_tiles = (a_end + tile - 1) // tile
            stats, acc_codec = lax.fori_loop(0, num_tiles, body, (stats, acc0))
        else:  # one fused kernel call reads every tile (same result, float rounding aside)
            m, den, acc = reader(kstore, vstore, qstate.reshape(b, kvh, g * t, -1), S, a_end)
            stats = (m.reshape(b, kvh, g, t), den.reshape(b, kvh, g, t), den.reshape(b, kvh, g, t))
            acc_codec = acc.reshape(b, kvh, g, t, -1)

        # B: [a_end, a_end + W + t): the recent and the new positions
        n_b = W + t
        pos = a_end + jnp.arange(n_b, dtype=jnp.int32)
        visible = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] >= S)  # (t, n_b)
        s = kc.scores(layer, kstore, qstate, a_end, n_b)
        has_window = self.key_rule != "none" or self.value_rule != "none"
        if has_window:
            # recent_* hold positions length - W ..; align them to a_end (they differ while length < W)
            shift = a_end - (length - W)
            fk = lax.dynamic_slice_in_dim(jnp.concatenate([recent_k, zeros], 1), shift, n_b, axis=1)
            fv = lax.dynamic_slice_in_dim(jnp.concatenate([recent_v, zeros], 1), shift, n_b, axis=1)
            key_fp = window_fp(self.key_rule, self.key_window, pos, q_pos)
            s_fp = jnp.einsum("bkgtd,bskd->bkgts", qs, fk, precision=_HIGHEST)
            s = jnp.where(key_fp[None, None, None], s_fp, s)
            value_fp = window_fp(self.value_rule, self.value_window, pos, q_pos)[None, None, None]
        else:
            value_fp = None
        (m, den, lq), p, corr = _online(*stats, s, visible, value_fp)
        acc_codec = acc_codec * corr[..., None]
        if value_fp is None:
            acc_codec = acc_codec + vc.mix(layer, vstore, p, a_end, n_b)
            acc_fp = jnp.zeros((b, kvh, g, t, hd), jnp.float32)
        else:
            acc_codec = acc_codec + vc.mix(layer, vstore, jnp.where(value_fp, 0.0, p), a_end, n_b)
            acc_fp = jnp.einsum("bkgts,bskd->bkgtd", jnp.where(value_fp, p, 0.0), fv, precision=_HIGHEST)

        # C: the sink
        sink_k, sink_v = self.sink_keys, self.sink_values
        if S:
            idx = jnp.clip(jnp.arange(S, dtype=jnp.int32) - length, 0, t - 1)
            fresh = ((jnp.arange(S) >= length) & (jnp.arange(S) < length + t))[None, :, None, None]
            dtype = self.sink_keys[layer].dtype
            sk = jnp.where(fresh, jnp.take(k, idx, axis=1).astype(dtype), self.sink_keys[layer])
            sv = jnp.where(fresh, jnp.take(v, idx, axis=1).astype(dtype), self.sink_values[layer])
            sink_k, sink_v = replace_layer(sink_k, layer, sk), replace_layer(sink_v, layer, sv)
            s = jnp.einsum("bkgtd,bskd->bkgts", qs, sk.astype(jnp.float32), precision=_HIGHEST)
            seen = jnp.arange(S, dtype=jnp.int32)[None, :] <= q_pos[:, None]
            (m, den, lq), p, corr = _online(m, den, lq, s, seen, jnp.ones((1, 1, 1, 1, 1), bool))
            acc_codec = acc_codec * corr[..., None]
            acc_fp = acc_fp * corr[..., None] + jnp.einsum(
                "bkgts,bskd->bkgtd", p, sv.astype(jnp.float32), precision=_HIGHEST
            )

        out = (vc.finish(layer, acc_codec, lq) + acc_fp) / den[..., None]
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)
        # writing past max_len cannot raise under jit: the result is NaN instead of silently wrong
        out = jnp.where(length + t <= self.max_len, out, jnp.nan)

        new = dict(keys=replace_layer(self.keys, layer, kstore), values=replace_layer(self.values, layer, vstore))
        dtype = jnp.dtype(self.window_dtype)
        if self.recent_keys:
            new["recent_keys"] = replace_layer(self.recent_keys, layer, recent_k[:, t:].astype(dtype))
        if self.recent_values:
            new["recent_values"] = replace_layer(self.recent_values, layer, recent_v[:, t:].astype(dtype))
        if S:
            new["sink_keys"], new["sink_values"] = sink_k, sink_v
        return out, dataclasses.replace(self, **new)

    def advance(self, num_tokens: int):
        return dataclasses.replace(self, length=self.length + jnp.int32(num_tokens))

    # ------------------------------------------------------------------ reading back

    def dequantized(self, layer: int, start: int = 0, size: int | None = None):
        """The codecs' reconstruction of the stored keys and values of positions start ..
        start + size - 1 (default: up to length), each (b, size, kvh, hd) float32: what attention
        reads for positions outside the full-precision window (the window and sink excluded).
        For tests and analysis; attention itself never builds this."""
        size = int(self.length) - start if size is None else size
        k = self.key_codec.dequant(layer, self.keys[layer], jnp.int32(start), size)
        v = self.value_codec.dequant(layer, self.values[layer], jnp.int32(start), size)
        return k, v

    # ------------------------------------------------------------------ accounting

    def bytes_per_token(self, context: int | None = None) -> float:
        """Bytes per token per layer at `context` stored tokens (default max_len): codes and their
        side data, plus the codebooks, the full-precision window and sink spread over the context."""
        return self.storage(context)["bytes_per_token"]

    def bits_per_element(self, context: int | None = None) -> float:
        """Effective bits per stored key or value element (bytes_per_token * 8 / (2 kvh hd))."""
        return self.storage(context)["bits_per_element"]

    def storage(self, context: int | None = None) -> dict:
        """The accounting behind bytes_per_token: a dict of its parts, per token per layer."""
        context = self.max_len if context is None else context
        kvh, hd = self.config.num_kv_heads, self.config.head_dim
        kbits, kfixed = self.key_codec.storage(kvh, hd)
        vbits, vfixed = self.value_codec.storage(kvh, hd)
        fp_bytes = jnp.dtype(self.window_dtype).itemsize * kvh * hd  # one token's key (or value)
        window = sum(
            min(r, context) for rule, r in ((self.key_rule, self.key_window), (self.value_rule, self.value_window))
            if rule != "none"
        )  # fmt: skip
        parts = dict(
            codes=(kbits + vbits) / 8,
            codebooks=(kfixed + vfixed) / context,
            window=window * fp_bytes / context,
            sink=min(self.sink, context) * 2 * fp_bytes / context,
        )
        total = sum(parts.values())
        return dict(
            parts,
            bytes_per_token=total,
            bits_per_element=total * 8 / (2 * kvh * hd),
            float16_fraction=total / (2 * 2 * kvh * hd),
            context=context,
        )

    # ------------------------------------------------------------------ checks

    def _check_inputs(self, layer, q, k, v):
        c = self.config
        if not 0 <= layer < len(self.keys):
            raise ValueError(
                f"layer {layer} but this cache holds {len(self.keys)} layers: it was built for another model; "
                "build it with make_cache(model, ...) for the model you run"
            )
        want = (c.num_kv_heads, c.head_dim)
        if tuple(k.shape[2:]) != want or tuple(v.shape[2:]) != want or q.shape[2:] != (c.num_heads, c.head_dim):
            raise ValueError(
                f"this cache was built for a model with {c.num_heads} query heads, {c.num_kv_heads} key/value heads "
                f"of {c.head_dim}, got q {tuple(q.shape)} and k {tuple(k.shape)}; build it with make_cache(model, ...) "
                "for the model you run"
            )
        if k.shape[0] != self.length_batch:
            raise ValueError(
                f"this cache holds a batch of {self.length_batch} sequences, got {k.shape[0]}; "
                f"build it with batch={k.shape[0]}"
            )

    @property
    def length_batch(self) -> int:
        return jax.tree_util.tree_leaves(self.keys[0])[0].shape[0]


def _online(m, den, lq, s, visible, value_fp):
    """One step of the online softmax over scores s (b, kvh, g, t, n) with visible (t, n).

    Returns the new (max, sum, codec sum), the unnormalised probabilities p (zero where not
    visible) and the factor corr that rescales what was accumulated before. `value_fp` (broadcast
    to s) marks the probabilities whose values are read in full precision (not the codec's)."""
    s = jnp.where(visible[None, None, None], s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    corr = jnp.exp(m - m_new)
    p = jnp.where(visible[None, None, None], jnp.exp(s - m_new[..., None]), 0.0)
    den = den * corr + jnp.sum(p, axis=-1)
    to_codec = p if value_fp is None else jnp.where(value_fp, 0.0, p)
    lq = lq * corr + jnp.sum(to_codec, axis=-1)
    return (m_new, den, lq), p, corr


def empty_cache(
    key_codec,
    value_codec,
    config: LlamaConfig,
    *,
    batch: int,
    max_len: int,
    method: str,
    key_rule: str = "none",
    key_window: int = 0,
    value_rule: str = "none",
    value_window: int = 0,
    sink: int = 0,
    tile: int = 512,
    read: str = "auto",
    window_dtype: str = "float16",
    description: tuple = (),
) -> CompressedKVCache:
    """An empty CompressedKVCache with stores sized for max_len (padded to whole tiles)."""
    kvh, hd = config.num_kv_heads, config.head_dim
    if read not in READS:
        raise ValueError(f"read must be one of {READS}, got {read!r}")
    for rule in (key_rule, value_rule):
        if rule not in RULES:
            raise ValueError(f"window rule must be one of {RULES}, got {rule!r}")
    window_slots = max(key_window if key_rule != "none" else 0, value_window if value_rule != "none" else 0)
    # room for: the B source read at a_end + W + t <= max_len + W, group writes past the end, whole tiles
    pad = max(key_codec.padding, value_codec.padding)
    capacity = -(-(max_len + window_slots + pad) // tile) * tile
    key_codec, value_codec = key_codec.for_capacity(capacity), value_codec.for_capacity(capacity)
    layers = range(config.num_layers)
    ks = tuple(key_codec.init(batch, capacity, kvh, hd) for _ in layers)
    vs = tuple(value_codec.init(batch, capacity, kvh, hd) for _ in layers)
    dtype = jnp.dtype(window_dtype)
    fp = lambda n: tuple(jnp.zeros((batch, n, kvh, hd), dtype) for _ in layers) if n else ()  # noqa: E731
    rk = fp(window_slots if key_rule != "none" else 0)
    rv = fp(window_slots if value_rule != "none" else 0)
    return CompressedKVCache(
        key_codec, value_codec, ks, vs, rk, rv, fp(sink), fp(sink), jnp.int32(0),
        config=config, max_len=max_len, method=method, key_rule=key_rule, key_window=key_window,
        value_rule=value_rule, value_window=value_window, window_slots=window_slots, sink=sink, tile=tile, read=read,
        window_dtype=window_dtype, description=description,
    )  # fmt: skip
