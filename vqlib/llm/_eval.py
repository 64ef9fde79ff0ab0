"""Perplexity on non-overlapping windows, the protocol of GPTQ-style evaluation scripts.

The text is tokenised in one call without special tokens (no BOS), cut into windows of `ctx`
tokens with stride `ctx` (the tail that does not fill a window is dropped); each window is an
independent sequence starting at position 0, scored on logits[:-1] against tokens[1:];
perplexity = exp(total NLL / scored tokens).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from vqlib import _checks, _progress
from vqlib.llm._model import Model, encode_text, token_nll

# The shared evaluation data, relative to the repository (../shared/data next to the checkout).
SHARED_DATA = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"
WIKITEXT2_TEST = ("wikitext-2", "wikitext-test.txt")
CALIBRATION = ("wikitext-2-tokens", "valid.txt")


def read_text(path) -> str:
    """A text file as one string, line ends normalised to LF (read with newline="")."""
    with open(path, encoding="utf-8", newline="") as f:
        return f.read().replace("\r\n", "\n")


def shared_file(parts: tuple[str, ...], root=None) -> pathlib.Path:
    """A file of the shared data folder; FileNotFoundError (saying where it looked) if absent."""
    path = pathlib.Path(root or os.environ.get("VQLIB_SHARED_DATA", SHARED_DATA)).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the text file explicitly or set VQLIB_SHARED_DATA")
    return path


def as_tokens(model: Model, data) -> np.ndarray:
    """Text (str) -> token ids; an integer array passes through (flattened to (n,) int32)."""
    if isinstance(data, str):
        return encode_text(model, data)
    ids = np.asarray(data)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"expected text (str) or an integer array of token ids, got dtype {ids.dtype}")
    ids = ids.reshape(-1).astype(np.int32)
    if ids.size and (ids.min() < 0 or ids.max() >= model.config.vocab_size):
        raise ValueError(f"token ids must lie in [0, {model.config.vocab_size}), got [{ids.min()}, {ids.max()}]")
    return ids


def windows(ids: np.ndarray, ctx: int, max_windows: int | None = None) -> np.ndarray:
    """(num_windows, ctx) non-overlapping windows of ids, the incomplete tail dropped."""
    n = len(ids) // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * ctx].reshape(n, ctx)


def perplexity(
    model: Model,
    text,
    *,
    ctx: int = 1024,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> float:
    """exp(mean NLL) over non-overlapping windows of `ctx` tokens (see the module docstring).

    Args:
        model: a Model (float or compressed).
        text: a string (tokenised by the model's tokenizer, no special tokens) or token ids.
        ctx: window length in tokens.
        max_windows: score only the first this many windows (None: all).
        batch_size: windows per forward call.
        progress: a progress bar on stderr (when it is a terminal).

    Returns:
        The perplexity (a Python float).

    Example:
        >>> import jax, numpy as np
        >>> from vqlib.llm import LlamaConfig, Model, init_params, perplexity
        >>> cfg = LlamaConfig(vocab_size=32, dim=16, num_layers=1, num_heads=2, num_kv_heads=1,
        ...                   head_dim=8, hidden_dim=32)
        >>> model = Model(cfg, init_params(jax.random.key(0), cfg))
        >>> ppl = perplexity(model, np.arange(64) % 32, ctx=16)
        >>> 25 < ppl < 40                      # near uniform over 32 tokens for random weights
        True
    """
    ctx = _checks.check_int(ctx, "ctx", low=2)
    batch_size = _checks.check_int(batch_size, "batch_size", low=1)
    if max_windows is not None:
        max_windows = _checks.check_int(max_windows, "max_windows", low=1)
    ids = as_tokens(model, text)
    wins = windows(ids, ctx, max_windows)
    if len(wins) == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of ctx={ctx}; use a smaller ctx")
    total, count = 0.0, 0
    with _progress.steps(len(wins), desc="perplexity", enabled=progress) as bar:
        for i in range(0, len(wins), batch_size):
            nll = np.asarray(token_nll(model.params, model.config, wins[i : i + batch_size]), np.float64)
            total += float(nll.sum())
            count += nll.size
            bar.update(min(batch_size, len(wins) - i))
            bar.set_postfix_str(f"ppl {np.exp(total / count):.4f}")
    return float(np.exp(total / count))
