"""The KV cache interface of the decoder, and the plain float cache.

A cache is a pytree that the decoder threads through every forward call (prefill, then one
token at a time). Its capacity (`max_len`) is fixed when it is created, so every decode step has
the same shapes and compiles once. The decoder talks to it through two methods only:

    out, cache = cache.attend(layer, q, k, v)   # once per layer, layer a Python int
    cache = cache.advance(t)                     # once per forward, after the last layer

`attend` stores the keys and values of the t new tokens of layer `layer` at positions
`cache.length .. cache.length + t - 1` and returns the causal attention of the new queries over
every stored position of that layer. Because the cache computes the attention itself, a
compressed cache can score queries against its codes directly (PQ/ADC tables, QJL sign
sketches) instead of decompressing; one that decompresses can call `attention` below.

To add a cache (KIVI, TurboQuant, PQ, ...): write a `pytree_dataclass` with a `length` leaf
(() int32) and per-layer state in tuples (one entry per layer: the layer index is a Python int,
so layers may even hold different shapes), a constructor `init_*_cache(config, batch, max_len)`,
and the two methods. Test it against `FloatKVCache`: the same prompt and decode steps must give
the same logits up to the compression error. Writing past `max_len` is the caller's mistake:
under jit it cannot raise (`dynamic_update_slice` would clamp), so the caches return NaN for
it and `generate`-style loops check it on the host before they start.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
from jax import lax

from vqlib import _checks
from vqlib._types import pytree_dataclass, static_field
from vqlib.llm._config import LlamaConfig

ALIGN = 64  # the float cache's buffers hold a multiple of this many positions


class KVCache(Protocol):
    """What the decoder needs from a cache (see the module docstring)."""

    length: jax.Array

    def attend(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, KVCache]:
        """q (b, t, h, hd), k and v (b, t, kvh, hd) of the t new tokens -> ((b, t, h, hd), new cache)."""
        ...

    def advance(self, num_tokens: int) -> KVCache:
        """The cache with `length` moved past the `num_tokens` tokens just stored."""
        ...


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """Causal grouped-query attention in float32 (softmax of q k^T / sqrt(hd)).

    Args:
        q: (b, t, h, hd) queries.
        k: (b, s, kvh, hd) keys; kvh divides h (query head j reads key head j // (h // kvh)).
        v: (b, s, kvh, hd) values.
        q_positions: (t,) int32 position of each query.
        k_positions: (s,) int32 position of each key; key i is seen by query j when
            k_positions[i] <= q_positions[j] (give unused slots a position past every query).

    Returns:
        (b, t, h, hd) float32.
    """
    b, t, h, hd = q.shape
    kvh = k.shape[2]
    q = q.astype(jnp.float32).reshape(b, t, kvh, h // kvh, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    scores = scores * jnp.float32(1.0 / hd**0.5)
    visible = k_positions[None, :] <= q_positions[:, None]  # (t, s)
    scores = jnp.where(visible[None, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return out.reshape(b, t, h, hd)


@pytree_dataclass
class FloatKVCache:
    """Keys and values kept as they are, one (b, capacity, kvh, hd) buffer pair per layer.

    The buffers hold max_len positions rounded up to a multiple of `ALIGN` (never written nor
    read: causality masks them): attention reads the whole buffer in every step, and XLA:CPU's
    products over an odd length ran 1.5x slower (8,209 positions against 8,256 at batch 1).

    Attributes:
        keys: per layer, (b, capacity, kvh, hd).
        values: per layer, (b, capacity, kvh, hd).
        length: () int32, tokens stored so far (the same for every sequence of the batch).
        max_len: tokens it may hold; a call that would store more returns NaN (under jit the
            write cannot raise, and `dynamic_update_slice` would clamp it silently).
    """

    keys: tuple
    values: tuple
    length: jax.Array
    max_len: int = static_field(0)

    def attend(self, layer: int, q, k, v):
        start = (0, self.length, 0, 0)
        keys = lax.dynamic_update_slice(self.keys[layer], k.astype(self.keys[layer].dtype), start)
        values = lax.dynamic_update_slice(self.values[layer], v.astype(self.values[layer].dtype), start)
        q_positions = self.length + jnp.arange(q.shape[1], dtype=jnp.int32)
        out = attention(q, keys, values, q_positions, jnp.arange(keys.shape[1], dtype=jnp.int32))
        out = jnp.where(self.length + q.shape[1] <= self.max_len, out, jnp.nan)
        new = dataclasses.replace(
            self,
            keys=(*self.keys[:layer], keys, *self.keys[layer + 1 :]),
            values=(*self.values[:layer], values, *self.values[layer + 1 :]),
        )
        return out, new

    def advance(self, num_tokens: int):
        return dataclasses.replace(self, length=self.length + jnp.int32(num_tokens))


def init_float_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> FloatKVCache:
    """An empty float cache for `batch` sequences of up to `max_len` tokens.

    Example:
        >>> from vqlib.llm import LlamaConfig, init_float_cache
        >>> cfg = LlamaConfig(vocab_size=32, dim=16, num_layers=2, num_heads=4, num_kv_heads=2,
        ...                   head_dim=4, hidden_dim=32)
        >>> cache = init_float_cache(cfg, batch=1, max_len=8)
        >>> cache.keys[0].shape, cache.max_len, int(cache.length)
        ((1, 64, 2, 4), 8, 0)
    """
    batch = _checks.check_int(batch, "batch", low=1)
    max_len = _checks.check_int(max_len, "max_len", low=1)
    return float_buffers(config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim, dtype)


def float_buffers(num_layers: int, batch: int, max_len: int, kvh: int, hd: int, dtype) -> FloatKVCache:
    """An empty float cache of these sizes (checked by the caller), buffers aligned to ALIGN."""
    shape = (batch, -(-max_len // ALIGN) * ALIGN, kvh, hd)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    return FloatKVCache(zeros, tuple(jnp.zeros_like(z) for z in zeros), jnp.int32(0), max_len=max_len)
