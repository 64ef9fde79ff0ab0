"""Lloyd-Max scalar quantizers of one coordinate of a uniform unit vector in R^d, in float64.

The law of y = <u, e_j> for u uniform on the sphere is f(t) ~ (1 - t^2)^((d - 3) / 2) on [-1, 1]
(variance 1/d, close to N(0, 1/d) for large d). Its Lloyd-Max codebook (centroids at the
conditional means of their cells, cell boundaries at the midpoints) is computed once per
(d, bits) by Lloyd iteration on the exact density (Gauss-Legendre quadrature in t = sin(theta),
where it reads cos(theta)^(d - 2)) and cached in memory; no table is stored in the code.

References:
    Max, "Quantizing for minimum distortion", IRE Trans. Information Theory, 1960.
    Lloyd, "Least squares quantization in PCM", 1982.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from vqlib import _checks

MAX_BITS = 6  # Lloyd iteration needs ~4x more steps per extra bit (b = 6: about 2 s, once per d)
_QUADRATURE = np.polynomial.legendre.leggauss(256)


def _cells(d: int, bounds: np.ndarray):
    """Quadrature of f on the cells [bounds[i], bounds[i+1]]: (cells, nodes) weights and nodes t.

    With t = sin(theta), f(t) dt = cos(theta)^(d-2) dtheta, smooth on [-pi/2, pi/2]; theta is
    clipped to 40 standard deviations (f is below 1e-300 of its peak beyond)."""
    limit = min(math.pi / 2, 40 / math.sqrt(d))
    theta = np.clip(np.arcsin(np.clip(bounds, -1.0, 1.0)), -limit, limit)
    nodes, weights = _QUADRATURE
    half = (theta[1:] - theta[:-1])[:, None] / 2
    mid = (theta[1:] + theta[:-1])[:, None] / 2 + half * nodes
    return half * weights * np.exp((d - 2) * np.log(np.cos(mid))), np.sin(mid)


def _bounds(centroids: np.ndarray) -> np.ndarray:
    return np.concatenate([[-1.0], (centroids[1:] + centroids[:-1]) / 2, [1.0]])


@functools.cache
def lloyd_max(d: int, bits: int) -> tuple[np.ndarray, float]:
    levels = 2**bits
    spread = min(1.0, 3 / math.sqrt(d))
    centroids = np.linspace(-spread, spread, 2 * levels + 1)[1::2]  # midpoints of equal cells
    for _ in range(100_000):
        w, t = _cells(d, _bounds(centroids))
        new = np.sum(w * t, axis=1) / np.sum(w, axis=1)
        new = (new - new[::-1]) / 2  # the law is symmetric; keep the codebook exactly so
        done = np.max(np.abs(new - centroids)) * math.sqrt(d) < 1e-10
        centroids = new
        if done:
            break
    w, t = _cells(d, _bounds(centroids))
    distortion = d * np.sum(w * (t - centroids[:, None]) ** 2) / np.sum(w)
    return centroids, float(distortion)


def lloyd_max_codebook(d: int, bits: int) -> tuple[np.ndarray, float]:
    """The Lloyd-Max quantizer of one coordinate of a uniform unit vector in R^d, in float64.

    Args:
        d: dimension, >= 2.
        bits: 0 to MAX_BITS; 2**bits levels (0 bits: the single centroid 0).

    Returns:
        (centroids (2**bits,) sorted float64, D) where D = d * E(y - c(y))^2 is the expected
        squared error ||u - u~||^2 of TurboQuant-mse on unit vectors u.

    Example:
        >>> from vqlib.codebooks import lloyd_max_codebook
        >>> c, dist = lloyd_max_codebook(128, 2)
        >>> round(dist, 4), round(float(c[-1]) * 128**0.5, 3)
        (0.116, 1.505)
    """
    d = _checks.check_int(d, "d", low=2)
    bits = _checks.check_int(bits, "bits", low=0, high=MAX_BITS)
    centroids, distortion = lloyd_max(d, bits)
    return centroids.copy(), distortion
