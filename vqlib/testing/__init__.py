"""Synthetic data for tests, benchmarks and the demo (public, so users can reproduce our figures)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def clustered(key, n: int, d: int, *, num_clusters: int = 64, intrinsic_dim: int = 8, noise: float = 0.1) -> jax.Array:
    """(n, d) float32 points around `num_clusters` centres on a random `intrinsic_dim`-dim subspace.

    Structured like real embeddings (low intrinsic dimension, clusters of unequal size),
    unlike iid Gaussian data on which every quantizer looks alike.
    """
    k_basis, k_centres, k_sizes, k_assign, k_latent, k_noise = jax.random.split(key, 6)
    r = min(intrinsic_dim, d)
    basis = jnp.linalg.qr(jax.random.normal(k_basis, (d, r)))[0]  # (d, r) orthonormal columns
    centres = 3.0 * jax.random.normal(k_centres, (num_clusters, r))
    sizes = jax.random.dirichlet(k_sizes, jnp.ones((num_clusters,)))
    members = jax.random.choice(k_assign, num_clusters, (n,), p=sizes)
    latent = centres[members] + jax.random.normal(k_latent, (n, r))
    return (latent @ basis.T + noise * jax.random.normal(k_noise, (n, d))).astype(jnp.float32)
