"""Shared types: the `pytree_dataclass` decorator every codebook, stats and index type uses, the
code layout, the metric vocabulary, and the registries the save format reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax

# Name -> class for every type that `vqlib.save` can write; filled by `pytree_dataclass`.
REGISTERED_TYPES: dict[str, type] = {}
# Class -> invariant check run by `vqlib.load` on every object of that class it rebuilds
# (filled by the layers that own the types: codebooks, indexes, models).
VALIDATORS: dict[type, Callable] = {}

Metric = Literal["l2", "ip", "cos"]
METRICS: tuple[str, ...] = ("l2", "ip", "cos")


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
