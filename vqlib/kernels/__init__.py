"""Kernels on arrays (never codebook objects), each beside a pure-jnp reference, one dispatcher per op."""

from vqlib.kernels.assign._dispatch import assign as assign
