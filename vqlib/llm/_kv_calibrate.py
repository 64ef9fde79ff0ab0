"""Calibration activations for the fitted KV caches (KVQuant, PQ, TurboQuant's outliers and means).

Keys and values are read off a float cache after a forward pass over calibration windows
(text that is not the test split: WikiText-2's validation text by default). KVQuant's
sensitivity weights are the squared gradients of the windows' summed NLL with respect to every
key (before RoPE) and value: the diagonal Fisher information of the paper, taken through a cache
that adds a zero perturbation to k and v and differentiates the loss at it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vqlib._types import pytree_dataclass, static_field
from vqlib.llm._config import LlamaConfig
from vqlib.llm._eval import CALIBRATION, as_tokens, read_text, shared_file, windows
from vqlib.llm._kv_cache import attention, init_float_cache
from vqlib.llm._kv_rope import rope, unrope
from vqlib.llm._model import Model, forward, hidden_states, linear


def calibration_tokens(model: Model, calibration=None, *, num_sequences: int, seq_len: int) -> np.ndarray:
    """(n, seq_len) int32 windows of calibration token ids (the first num_sequences of them).

    `calibration`: text, token ids, or None for WikiText-2's validation text in the shared data
    folder (`../shared/data/wikitext-2-tokens/valid.txt`, or $VQLIB_SHARED_DATA)."""
    if calibration is None:
        calibration = read_text(shared_file(CALIBRATION))
    ids = as_tokens(model, calibration)
    wins = windows(ids, seq_len, num_sequences)
    if len(wins) == 0:
        raise ValueError(
            f"calibration has {len(ids)} tokens, fewer than one sequence of seq_len={seq_len}; "
            "pass more calibration text or a smaller seq_len"
        )
    return wins


def collect_kv(model: Model, tokens: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Post-RoPE keys and values of every calibration token: per layer, (n * seq_len, kvh, hd) float32."""
    config = model.config
    keys = [[] for _ in range(config.num_layers)]
    values = [[] for _ in range(config.num_layers)]
    for row in tokens:
        cache = init_float_cache(config, 1, len(row))
        _, cache = forward(model.params, config, jnp.asarray(row[None], jnp.int32), cache)
        for layer in range(config.num_layers):
            keys[layer].append(np.asarray(cache.keys[layer][0]))
            values[layer].append(np.asarray(cache.values[layer][0]))
    return [np.concatenate(k) for k in keys], [np.concatenate(v) for v in values]


def pre_rope_keys(config: LlamaConfig, keys: np.ndarray, seq_len: int) -> np.ndarray:
    """Post-RoPE keys (n * seq_len, kvh, hd) of consecutive windows -> the keys before RoPE."""
    x = jnp.asarray(keys).reshape(-1, seq_len, *keys.shape[1:])
    return np.asarray(unrope(config, x, jnp.int32(0))).reshape(keys.shape)


@pytree_dataclass
class _ProbeCache:
    """Attention over the call's own tokens with k + RoPE(dk) and v + dv (zeros): its gradients
    are those of the loss with respect to the keys before RoPE and the values."""

    dk: tuple
    dv: tuple
    length: jax.Array
    config: LlamaConfig = static_field()

    def attend(self, layer, q, k, v):
        t = q.shape[1]
        k = k + rope(self.config, self.dk[layer], jnp.int32(0))
        v = v + self.dv[layer]
        pos = jnp.arange(t, dtype=jnp.int32)
        return attention(q, k, v, pos, pos), self

    def advance(self, num_tokens):
        return self


@functools.partial(jax.jit, static_argnames="config")
def _squared_grads(params, config: LlamaConfig, tokens):
    def loss(dk, dv):
        cache = _ProbeCache(dk, dv, jnp.int32(0), config)
        h, _ = hidden_states(params, config, tokens[:, :-1], cache)
        logp = jax.nn.log_softmax(linear(h, params.head), axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    shape = (tokens.shape[0], tokens.shape[1] - 1, config.num_kv_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, jnp.float32) for _ in range(config.num_layers))
    gk, gv = jax.grad(loss, argnums=(0, 1))(zeros, zeros)
    return tuple(g * g for g in gk), tuple(g * g for g in gv)


def kv_sensitivity(model: Model, tokens: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Squared loss gradients (diagonal Fisher) of the keys before RoPE and of the values, per
    layer (n * seq_len, kvh, hd) float32, aligned with `collect_kv` (the last token of each
    window, which no prediction reads, gets the smallest weight of its window)."""
    config = model.config
    out_k = [[] for _ in range(config.num_layers)]
    out_v = [[] for _ in range(config.num_layers)]
    for row in tokens:
        gk, gv = _squared_grads(model.params, config, jnp.asarray(row[None], jnp.int32))
        for layer in range(config.num_layers):
            for out, g in ((out_k, gk), (out_v, gv)):
                g = np.asarray(g[layer][0])
                out[layer].append(np.concatenate([g, g.min(axis=0, keepdims=True)]))
    return [np.concatenate(k) for k in out_k], [np.concatenate(v) for v in out_v]
