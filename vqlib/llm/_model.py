"""A compact Llama-family decoder: pure functions over a params pytree.

    h = embed[tokens]
    for each block:  h = h + W_o attn(RoPE(W_q a), RoPE(W_k a), W_v a),  a = RMSNorm(h)
                     h = h + W_down (silu(W_gate m) * W_up m),             m = RMSNorm(h)
    logits = RMSNorm(h) W_head^T            (W_head = embed when the embeddings are tied)

Attention is grouped-query (num_kv_heads key/value heads, each read by num_heads / num_kv_heads
query heads); RoPE is Hugging Face's "rotate half" layout (GGUF's interleaved q/k rows are
un-permuted on load). Every linear weight is a float (out, in) array, a `vqlib.kernels.LUTWeight`
or a `CompressedWeight`, and goes through `linear`. The blocks are a tuple, so a compressed model
may mix formats per layer; the layer loop is unrolled under jit. Keys and values go through a
pluggable cache (`vqlib.llm._kv_cache`); without one, a call attends within its own tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vqlib._types import pytree_dataclass, static_field
from vqlib.llm._config import LlamaConfig
from vqlib.llm._kv_cache import KVCache, attention
from vqlib.llm._weights import decode_rows, linear

LINEARS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@pytree_dataclass
class Block:
    """One transformer block. Linear weights are (out, in): wq (h*hd, dim), wk and wv
    (kvh*hd, dim), wo (dim, h*hd), w_gate and w_up (hidden, dim), w_down (dim, hidden);
    attn_norm and mlp_norm are (dim,) RMSNorm gains."""

    attn_norm: jax.Array
    wq: jax.Array
    wk: jax.Array
    wv: jax.Array
    wo: jax.Array
    mlp_norm: jax.Array
    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array


@pytree_dataclass
class Params:
    """embed (vocab, dim); blocks, a tuple of Block; final_norm (dim,); lm_head (vocab, dim), or
    None when the embeddings are tied (the head is `embed`)."""

    embed: jax.Array
    blocks: tuple
    final_norm: jax.Array
    lm_head: jax.Array | None = None

    @property
    def head(self):
        return self.embed if self.lm_head is None else self.lm_head


@pytree_dataclass
class Model:
    """A decoder and its tokenizer, as `vqlib.llm.load` and `compress` return it (savable with `vqlib.save`).

    Attributes:
        config: LlamaConfig.
        params: Params.
        tokenizer: the tokenizer as UTF-8 bytes of a Hugging Face `tokenizer.json` (uint8 array),
            or None; `tokenizer(model)` builds it.
        info: (name, value) pairs: where the model came from and, for a compressed model, the
            method, its options and the seconds compression took.
    """

    config: LlamaConfig
    params: Params
    tokenizer: jax.Array | None = None
    info: tuple = static_field(())

    def describe(self) -> dict:
        return dict(self.info)


# ----------------------------------------------------------------------------- layers


def rms_norm(x: jax.Array, gain: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * gain over the last axis, in float32."""
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + jnp.float32(eps))
    return x * gain.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))


def rope_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin (t, head_dim) for positions (t,), Hugging Face's layout (frequencies repeated)."""
    hd = config.head_dim
    inv_freq = 1.0 / (jnp.float32(config.rope_theta) ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / jnp.float32(hd)))
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    """(..., hd) -> [-x[hd/2:], x[:hd/2]]: RoPE's quarter turn of each pair (c, c + hd/2)."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (b, t, heads, hd) rotated by position: x cos + rotate_half(x) sin."""
    return x * cos[None, :, None, :] + rotate_half(x) * sin[None, :, None, :]


def attention_context(blk: Block, config: LlamaConfig, a, cos, sin, positions, cache, layer: int):
    """Normed input a (b, t, dim) -> attention output before W_o (b, t, h*hd), and the cache."""
    b, t, _ = a.shape
    q = linear(a, blk.wq).reshape(b, t, config.num_heads, config.head_dim)
    k = linear(a, blk.wk).reshape(b, t, config.num_kv_heads, config.head_dim)
    v = linear(a, blk.wv).reshape(b, t, config.num_kv_heads, config.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is None:
        out = attention(q, k, v, positions, positions)
    else:
        out, cache = cache.attend(layer, q, k, v)
    return out.reshape(b, t, config.q_dim), cache


def mlp_hidden(blk: Block, m: jax.Array) -> jax.Array:
    """Normed input m (..., dim) -> silu(W_gate m) * W_up m (..., hidden)."""
    return jax.nn.silu(linear(m, blk.w_gate)) * linear(m, blk.w_up)


def block_forward(blk: Block, config: LlamaConfig, h, cos, sin, positions, cache=None, layer: int = 0):
    """One block on the residual stream h (b, t, dim)."""
    a = rms_norm(h, blk.attn_norm, config.norm_eps)
    ctx, cache = attention_context(blk, config, a, cos, sin, positions, cache, layer)
    h = h + linear(ctx, blk.wo)
    h = h + linear(mlp_hidden(blk, rms_norm(h, blk.mlp_norm, config.norm_eps)), blk.w_down)
    return h, cache


@jax.jit
def block_outputs(blk: Block, config: LlamaConfig, h):
    """The block applied to h (b, t, dim) as a whole sequence each (no cache)."""
    positions = jnp.arange(h.shape[1], dtype=jnp.int32)
    cos, sin = rope_tables(config, positions)
    return block_forward(blk, config, h, cos, sin, positions)[0]


def embed_tokens(params: Params, tokens: jax.Array) -> jax.Array:
    """tokens (b, t) int -> (b, t, dim) float32 embedding rows (decoding only those rows)."""
    rows = decode_rows(params.embed, tokens.reshape(-1).astype(jnp.int32))
    return rows.reshape(*tokens.shape, -1)


def hidden_states(
    params: Params, config: LlamaConfig, tokens: jax.Array, cache: KVCache | None = None, *, remat: bool = False
):
    """The final normed hidden states (b, t, dim) and the cache (advanced past the t tokens).

    remat: under differentiation, keep only each block's input and recompute the block in the
    backward pass (`jax.checkpoint`), so a compressed block's decoded weights are not all held."""
    start = jnp.int32(0) if cache is None else cache.length
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    cos, sin = rope_tables(config, positions)
    h = embed_tokens(params, tokens)
    step = jax.checkpoint(block_forward, static_argnums=(1, 7)) if remat else block_forward
    for layer, blk in enumerate(params.blocks):
        h, cache = step(blk, config, h, cos, sin, positions, cache, layer)
    if cache is not None:
        cache = cache.advance(tokens.shape[1])
    return rms_norm(h, params.final_norm, config.norm_eps), cache


@jax.jit
def forward(params: Params, config: LlamaConfig, tokens: jax.Array, cache: KVCache | None = None):
    """Logits (b, t, vocab) float32 for tokens (b, t), and the cache (None in, None out).

    With a cache, the t tokens sit at positions cache.length .. cache.length + t - 1 and attend
    to everything stored before them (prefill: t = prompt length; decode: t = 1).

    Example:
        >>> import jax
        >>> from vqlib.llm import LlamaConfig, forward, init_params
        >>> cfg = LlamaConfig(vocab_size=32, dim=16, num_layers=2, num_heads=4, num_kv_heads=2,
        ...                   head_dim=4, hidden_dim=32)
        >>> params = init_params(jax.random.key(0), cfg)
        >>> logits, _ = forward(params, cfg, jax.numpy.zeros((1, 5), "int32"))
        >>> logits.shape
        (1, 5, 32)
    """
    h, cache = hidden_states(params, config, tokens, cache)
    return linear(h, params.head), cache


@jax.jit
def token_nll(params: Params, config: LlamaConfig, tokens: jax.Array) -> jax.Array:
    """Negative log-likelihood (b, t - 1) float32 of tokens[:, 1:] given the tokens before them."""
    h, _ = hidden_states(params, config, tokens[:, :-1])
    logits = linear(h, params.head)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]


# ----------------------------------------------------------------------------- construction


def init_params(key, config: LlamaConfig, *, scale: float = 0.02) -> Params:
    """Random float32 params (weights N(0, scale^2), norm gains near 1), for tests and examples."""
    keys = iter(jax.random.split(key, 4 + 9 * config.num_layers))

    def normal(shape):
        return scale * jax.random.normal(next(keys), shape, jnp.float32)

    def gain():
        return 1.0 + 0.1 * jax.random.normal(next(keys), (config.dim,), jnp.float32)

    d, f = config.dim, config.hidden_dim
    blocks = tuple(
        Block(
            attn_norm=gain(),
            wq=normal((config.q_dim, d)),
            wk=normal((config.kv_dim, d)),
            wv=normal((config.kv_dim, d)),
            wo=normal((d, config.q_dim)),
            mlp_norm=gain(),
            w_gate=normal((f, d)),
            w_up=normal((f, d)),
            w_down=normal((d, f)),
        )
        for _ in range(config.num_layers)
    )
    embed = normal((config.vocab_size, d))
    head = None if config.tie_embeddings else normal((config.vocab_size, d))
    return Params(embed=embed, blocks=blocks, final_norm=gain(), lm_head=head)


def check_params(params: Params, config: LlamaConfig) -> None:
    """ValueError when a weight's shape does not match the config (names the weight)."""
    d, f, v = config.dim, config.hidden_dim, config.vocab_size
    want = dict(wq=(config.q_dim, d), wk=(config.kv_dim, d), wv=(config.kv_dim, d), wo=(d, config.q_dim))
    want |= dict(w_gate=(f, d), w_up=(f, d), w_down=(d, f), attn_norm=(d,), mlp_norm=(d,))
    if len(params.blocks) != config.num_layers:
        raise ValueError(f"params have {len(params.blocks)} blocks but config.num_layers={config.num_layers}")
    checks = [("embed", params.embed, (v, d)), ("final_norm", params.final_norm, (d,))]
    if (params.lm_head is None) != config.tie_embeddings:
        raise ValueError(f"lm_head must be None exactly when tie_embeddings (config says {config.tie_embeddings})")
    if params.lm_head is not None:
        checks.append(("lm_head", params.lm_head, (v, d)))
    for i, blk in enumerate(params.blocks):
        checks += [(f"blocks[{i}].{name}", getattr(blk, name), shape) for name, shape in want.items()]
    for name, w, shape in checks:
        if tuple(w.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(w.shape)}, but the config needs {shape}")


# ----------------------------------------------------------------------------- tokenizer and decoding


@functools.lru_cache(maxsize=8)
def _tokenizer_from_json(text: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)


def tokenizer(model: Model):
    """The model's `tokenizers.Tokenizer` (built from the stored tokenizer.json, cached)."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer; pass token ids (an int array) instead of text")
    return _tokenizer_from_json(np.asarray(model.tokenizer, np.uint8).tobytes().decode("utf-8"))


def tokenizer_bytes(tok) -> np.ndarray:
    """A `tokenizers.Tokenizer` as the uint8 array `Model.tokenizer` stores."""
    return np.frombuffer(tok.to_str().encode("utf-8"), np.uint8).copy()


def encode_text(model: Model, text: str) -> np.ndarray:
    """Token ids (n,) int32 of `text`, in one call, without special tokens (no BOS)."""
    return np.asarray(tokenizer(model).encode(text, add_special_tokens=False).ids, np.int32)
