"""Shared types: the `pytree_dataclass` decorator every codebook, stats and index type uses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

# Name -> class for every type that `vqlib.save` can write; filled by `pytree_dataclass`.
REGISTERED_TYPES: dict[str, type] = {}


def static_field(default=dataclasses.MISSING):
    """A dataclass field that is not a leaf: hashable, part of the jit cache key, saved as JSON."""
    return dataclasses.field(default=default, metadata=dict(static=True))


def pytree_dataclass(cls):
    """Frozen dataclass, registered as a JAX pytree (arrays are leaves) and as a savable type."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    cls = jax.tree_util.register_dataclass(cls)
    name = f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"
    REGISTERED_TYPES[name] = cls  # a module reload replaces the class of the same name
    return cls


class CodeLayout(NamedTuple):
    """What one encoded vector holds: `num_codebooks` codes in [0, num_codes), plus `side_bits`
    of side data stored beside them (a norm, a scale); `bits_per_vector` counts both."""

    num_codebooks: int
    num_codes: int
    side_bits: int = 0

    @property
    def bits(self) -> int:
        """Bits per code: the width `vqlib.codebooks.pack_codes` packs at."""
        return max(1, (self.num_codes - 1).bit_length())

    @property
    def bits_per_vector(self) -> int:
        return self.num_codebooks * self.bits + self.side_bits


class Quantizer(NamedTuple):
    """A quantization method as pure functions (cf. optax.GradientTransformation).

    fit(key, x, **options) -> codebook; encode(codebook, x) -> int32 codes;
    decode(codebook, codes) -> vectors; layout(codebook) -> CodeLayout;
    tables(codebook, queries, metric=) -> (q, m, k) ADC lookup tables, or None when the
    codes do not support table lookups.
    """

    fit: Callable[..., Any]
    encode: Callable[[Any, jax.Array], jax.Array]
    decode: Callable[[Any, jax.Array], jax.Array]
    layout: Callable[[Any], CodeLayout]
    tables: Callable[..., jax.Array] | None = None
