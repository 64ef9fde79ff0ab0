"""RoPE seen from a cache: keys arrive rotated by position; a codec that quantises them before
RoPE (KVQuant, pre-RoPE TurboQuant) undoes the rotation on write and applies it again to each
decoded tile.

Inside a cache the angles come from a `RopeTable` of every position it can hold, computed once
when the cache is made: a decode step then slices it. Computed inside the step instead, XLA:CPU
fuses the cosines and sines into the rotation and evaluates them per element of the tile (all
heads, every batch row): 0.36-0.63 ms per 512-position tile against 0.02-0.03 ms for the slice
(measured on the benchmark's Xeon)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from vqlib._types import pytree_dataclass
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


@pytree_dataclass
class RopeTable:
    """cos and sin (capacity, hd) of positions 0 .. capacity - 1: float32, the values
    `rope_tables` computes. Both halves are kept although they repeat: widening a half-table
    inside the step made the rotation of a tile 1.6x slower (the concatenation is not fused)."""

    cos: jax.Array
    sin: jax.Array

    @classmethod
    def build(cls, config: LlamaConfig, capacity: int) -> RopeTable:
        return cls(*rope_tables(config, jnp.arange(capacity, dtype=jnp.int32)))

    @property
    def capacity(self) -> int:
        return self.cos.shape[0]

    def angles(self, start, size: int):
        """cos and sin (size, hd) of positions start .. start + size - 1."""
        if size > self.capacity:
            raise ValueError(f"a RoPE table of {self.capacity} positions cannot rotate {size} at once")
        c = lax.dynamic_slice_in_dim(self.cos, start, size, axis=0)
        return c, lax.dynamic_slice_in_dim(self.sin, start, size, axis=0)

    def rope(self, x, start):
        """As `rope`, x (b, size, heads, hd) at positions start .. start + size - 1 < capacity."""
        cos, sin = self.angles(start, x.shape[1])
        return apply_rope(x, cos, sin)

    def unrope(self, x, start):
        cos, sin = self.angles(start, x.shape[1])
        return apply_rope(x, cos, -sin)


def angles_at(table: RopeTable | None, config: LlamaConfig, start, size: int):
    """cos and sin (size, hd) of positions start .. start + size - 1: from the table when a cache
    gave one, else from the config."""
    if table is None:
        return rope_tables(config, positions_of(start, size))
    return table.angles(start, size)


def rope_at(table: RopeTable | None, config: LlamaConfig, x, start, *, inverse: bool = False):
    """`rope` (or `unrope`) through the table when a cache gave one, else from the config."""
    if table is None:
        return (unrope if inverse else rope)(config, x, start)
    return table.unrope(x, start) if inverse else table.rope(x, start)
