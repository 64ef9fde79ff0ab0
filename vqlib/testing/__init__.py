"""Synthetic data and measuring helpers for tests, benchmarks and the demo (public, so users can
reproduce our figures)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def mse(x, x_hat) -> float:
    """Mean over rows of the squared error ||x - x_hat||^2, in float64."""
    return float(np.mean(np.sum((np.asarray(x, np.float64) - np.asarray(x_hat, np.float64)) ** 2, axis=1)))


def process_memory(field: str = "VmHWM") -> int:
    """Bytes of this process's resident memory from /proc/self/status (Linux): "VmRSS" now,
    "VmHWM" its peak. Not getrusage's ru_maxrss, which a child inherits from its parent across
    fork and exec (a test's subprocess would report the pytest worker's peak)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), seconds), waiting for every array in the result to be computed."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


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
