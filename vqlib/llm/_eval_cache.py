"""Perplexity through a KV cache: every window scored as if it were decoded token by token.

The protocol is `vqlib.llm.perplexity`'s (non-overlapping windows of `ctx` tokens, no BOS, NLL
of tokens[1:] given the tokens before them), with keys and values going through the cache: token
p's key and value enter the cache before its own attention, and its query reads every earlier
key and value as the cache stores them (codes, or full precision where the cache keeps it so).
A window is one call of the decoder over its ctx - 1 inputs, which the cache's `attend` defines to
equal ctx - 1 one-token decode steps (`token_by_token=True` runs those steps; a test checks the
two agree).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vqlib import _checks, _progress
from vqlib.llm._config import LlamaConfig
from vqlib.llm._eval import as_tokens, windows
from vqlib.llm._eval import perplexity as perplexity_without_cache
from vqlib.llm._kv_make import cache_batch, check_cache_for
from vqlib.llm._model import Model, forward, hidden_states, linear


@functools.partial(jax.jit, static_argnames="config")
def _nll_through_cache(params, config: LlamaConfig, tokens, cache):
    """(b, t - 1) NLL of tokens[:, 1:], the inputs tokens[:, :-1] stored in the (empty) cache."""
    h, _ = hidden_states(params, config, tokens[:, :-1], cache)
    logp = jax.nn.log_softmax(linear(h, params.head), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]


def _nll_token_by_token(model: Model, tokens, cache):
    nll = []
    for i in range(tokens.shape[1] - 1):
        logits, cache = forward(model.params, model.config, tokens[:, i : i + 1], cache)
        logp = jax.nn.log_softmax(logits[:, 0], axis=-1)
        nll.append(-jnp.take_along_axis(logp, tokens[:, i + 1, None], axis=-1)[:, 0])
    return jnp.stack(nll, axis=1)


def window_nll(model: Model, tokens, kv_cache, *, token_by_token: bool = False) -> np.ndarray:
    """NLL (b, t - 1) float64 of windows tokens (b, t) through an empty kv_cache of batch b."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if token_by_token:
        return np.asarray(_nll_token_by_token(model, tokens, kv_cache), np.float64)
    return np.asarray(_nll_through_cache(model.params, model.config, tokens, kv_cache), np.float64)


def perplexity(
    model: Model,
    text,
    *,
    kv_cache=None,
    ctx: int = 1024,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
    token_by_token: bool = False,
) -> float:
    """exp(mean NLL) over non-overlapping windows, keys and values through `kv_cache`.

    Args:
        model: a Model.
        text: a string or token ids.
        kv_cache: an empty cache from `make_cache(model, ..., max_len >= ctx - 1)` (its batch is
            the number of windows per call; windows past the last whole batch are dropped);
            None: `vqlib.llm.perplexity` without a cache.
        ctx: window length in tokens.
        max_windows: score only the first this many windows.
        batch_size: windows per call without a cache (with one, the cache's batch).
        progress: a progress bar on stderr (when it is a terminal).
        token_by_token: decode each window one token at a time (slow; the reference semantics).

    Returns:
        The perplexity (a Python float).

    Example:
        >>> import jax, numpy as np
        >>> from vqlib.llm import LlamaConfig, Model, init_params
        >>> from vqlib.llm import make_cache, perplexity
        >>> cfg = LlamaConfig(vocab_size=32, dim=32, num_layers=1, num_heads=2, num_kv_heads=1,
        ...                   head_dim=32, hidden_dim=64)
        >>> model = Model(cfg, init_params(jax.random.key(0), cfg))
        >>> cache = make_cache(model, "kivi", bits=4, max_len=16, window=0)
        >>> ppl = perplexity(model, np.arange(64) % 32, kv_cache=cache, ctx=16)
        >>> 25 < ppl < 40
        True
    """
    if kv_cache is None:
        return perplexity_without_cache(
            model, text, ctx=ctx, max_windows=max_windows, batch_size=batch_size, progress=progress
        )
    ctx = _checks.check_int(ctx, "ctx", low=2)
    if max_windows is not None:
        max_windows = _checks.check_int(max_windows, "max_windows", low=1)
    check_cache_for(kv_cache, model, ctx - 1)
    batch = cache_batch(kv_cache)
    wins = windows(as_tokens(model, text), ctx, max_windows)
    if len(wins) < batch:
        raise ValueError(
            f"the text gives {len(wins)} windows of ctx={ctx}, fewer than the cache's batch of {batch}; "
            "use a cache with batch=1 or more text"
        )
    total, count = 0.0, 0
    desc = f"perplexity ({getattr(kv_cache, 'method', 'float')} cache)"
    with _progress.steps(len(wins) // batch * batch, desc=desc, enabled=progress) as bar:
        for i in range(0, len(wins) - batch + 1, batch):
            nll = window_nll(model, wins[i : i + batch], kv_cache, token_by_token=token_by_token)
            total += float(nll.sum())
            count += nll.size
            bar.update(batch)
            bar.set_postfix_str(f"ppl {np.exp(total / count):.4f}")
    return float(np.exp(total / count))
