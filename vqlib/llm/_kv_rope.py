"""RoPE seen from a cache: keys arrive rotated by position; a codec that quantises them before
RoPE (KVQuant) undoes the rotation on write and applies it again to each decoded tile."""

from __future__ import annotations

import jax.numpy as jnp

from vqlib.llm._config import LlamaConfig
from vqlib.llm._model import apply_rope, rope_tables


def positions_of(start, size: int):
    """(size,) int32 positions start .. start + size - 1 (start may be traced)."""
    return start + jnp.arange(size, dtype=jnp.int32)


def rope(config: LlamaConfig, x, start):
    """x (b, size, heads, hd) rotated to positions start .. start + size - 1."""
    cos, sin = rope_tables(config, positions_of(start, x.shape[1]))
    return apply_rope(x, cos, sin)


def unrope(config: LlamaConfig, x, start):
    """The inverse of `rope` (RoPE is orthogonal: rotate by minus the angle)."""
    cos, sin = rope_tables(config, positions_of(start, x.shape[1]))
    return apply_rope(x, cos, -sin)
