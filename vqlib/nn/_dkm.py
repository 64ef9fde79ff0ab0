"""DKM: differentiable k-means weight clustering as nnx layers, and a model-wide palettiser.

`DKM` clusters one weight by attention-weighted centroid updates in each forward pass
(`vqlib.codebooks.dkm`); `DKMPalettizer(model, bits=b)` wraps any nnx model and replaces every
kernel (the `nnx.Param`s named "kernel": `nnx.Linear`, `nnx.Conv`, ...) by its DKM clustering into
2**b values, so fine-tuning with the usual loss teaches the weights to cluster. After
`model.eval()` the clustering is hard: every weight becomes its nearest centroid, exactly what
`vqlib.nn.export_palettized` stores. Warm-started centroids are a `QuantizerState`, which optimizers
filtering on `nnx.Param` leave alone.

References:
    Cho, Alizadeh-Vahid, Adya & Rastegari, "DKM: differentiable k-means clustering layer for
    neural network compression", ICLR 2022 (arXiv 2108.12659).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vqlib import _checks
from vqlib.codebooks import dkm, fit_kmeans
from vqlib.nn._common import KERNELS, QuantizerState, _check_bits, _check_kernel_sizes, _kernels, _name, _nearest


class DKM(nnx.Module):
    """Differentiable k-means of one weight tensor (`vqlib.codebooks.dkm`), holding its centroids.

    Training (`deterministic=False`): `layer(w)` returns the soft DKM reconstruction of w (n, d)
    after `max_iter` attention updates of the centroids, differentiable in w. Unless
    `train_centroids`, the updated centroids are stored as the next call's start (warm start, as
    in the paper); with it, they are an `nnx.Param` and the gradient flows to them through the
    iterations. Eval (`deterministic=True`): the hard reconstruction, each row of w replaced by
    its nearest centroid.

    The temperature is relative to the weights' scale: the softmax logits are
    -||w - c||^2 / (tau * var(w)), so one tau suits kernels of any magnitude. `tau` may be a
    schedule (a function of the step count, e.g. `optax.exponential_decay(0.05, 1000, 0.1)`);
    the step counts training calls.

    Example:
        >>> import jax, jax.numpy as jnp, vqlib
        >>> w = jax.random.normal(jax.random.key(0), (256, 1))
        >>> layer = vqlib.nn.DKM(jnp.array([[-1.0], [0.0], [1.0]]), tau=0.01)
        >>> layer(w).shape, int(layer.step[...])                # soft, differentiable in w
        ((256, 1), 1)
        >>> layer.eval()
        >>> len(jnp.unique(layer(w)))                           # hard: each weight is a centroid
        3
    """

    def __init__(self, centroids, *, tau: float | Callable = 0.01, max_iter: int = 3, train_centroids: bool = False):
        centroids = _checks.check_float_array(centroids, "centroids", ndim=2).astype(jnp.float32)
        if not callable(tau):
            _checks.check_tau(tau)
        self.max_iter = _checks.check_int(max_iter, "max_iter", low=0)
        self.tau = tau
        self.train_centroids = bool(train_centroids)
        self.centroids = nnx.Param(centroids) if self.train_centroids else QuantizerState(centroids)
        self.step = QuantizerState(jnp.zeros((), jnp.int32))
        self.deterministic = False

    def __call__(self, w):
        """(n, d) weights -> (n, d) their clustering (soft in training, hard in eval)."""
        c = self.centroids.get_value()
        if self.deterministic:
            return _nearest(w, c).astype(w.dtype)
        tau = self.tau(self.step.get_value()) if callable(self.tau) else self.tau
        scale = jax.lax.stop_gradient(jnp.maximum(jnp.var(w), jnp.finfo(jnp.float32).tiny))
        start = c if self.train_centroids else jax.lax.stop_gradient(c)
        w_soft, c_new = dkm(w, start, tau=tau * scale, max_iter=self.max_iter)
        if not self.train_centroids:
            self.centroids.set_value(jax.lax.stop_gradient(c_new))
        self.step.set_value(self.step.get_value() + 1)
        return w_soft


class DKMPalettizer(nnx.Module):
    """Wraps an nnx model so that every kernel is DKM-clustered to `bits` bits in the forward pass.

    Each kernel gets a `DKM` layer whose centroids start at the k-means (`fit_kmeans`) clustering
    of its weights into 2**bits scalar values. `palettizer(*args)` calls the wrapped model with
    the clustered kernels (soft in training, hard after `.eval()`); gradients reach the float
    kernels and every other parameter, so `nnx.Optimizer(palettizer, tx, wrt=nnx.Param)`
    fine-tunes the model to survive palettisation. Other state the model updates in its forward
    pass (batch statistics, RNG counts) is written back to the wrapped model.

    Args:
        model: any nnx model; its kernels are the `nnx.Param`s named "kernel".
        bits: bits per weight, 1 to 8; every kernel needs at least 2**bits weights.
        tau: DKM temperature relative to each kernel's variance, or a schedule of the step.
        max_iter: DKM iterations per forward pass (a fixed count).
        train_centroids: train the centroids by gradient instead of warm-starting them.
        key: PRNG key for the k-means initialisation; defaults to `jax.random.key(0)`.

    Example:
        >>> import jax, jax.numpy as jnp, optax, vqlib
        >>> from flax import nnx
        >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
        >>> pal = vqlib.nn.DKMPalettizer(model, bits=2)
        >>> opt = nnx.Optimizer(pal, optax.sgd(1e-2), wrt=nnx.Param)
        >>> @nnx.jit
        ... def train_step(pal, opt, x, y):
        ...     loss, grads = nnx.value_and_grad(lambda pal: jnp.mean((pal(x) - y) ** 2))(pal)
        ...     opt.update(pal, grads)
        ...     return loss
        >>> x, y = jnp.ones((16, 8)), jnp.zeros((16, 4))
        >>> losses = [float(train_step(pal, opt, x, y)) for _ in range(5)]
        >>> pal.eval()
        >>> compressed = vqlib.nn.export_palettized(pal)      # 2-bit codes + 4-value codebook per kernel
        >>> len(jnp.unique(vqlib.nn.load_palettized(model, compressed).kernel[...]))
        4
    """

    def __init__(
        self,
        model,
        *,
        bits: int,
        tau: float | Callable = 0.01,
        max_iter: int = 3,
        train_centroids: bool = False,
        key=None,
    ):
        self.bits = _check_bits(bits)
        kernels = _kernels(model)
        _check_kernel_sizes(kernels, self.bits)
        keys = jax.random.split(jax.random.key(0) if key is None else key, len(kernels))
        self.model = model
        self.names = tuple(name for name, _ in kernels)
        self.layers = nnx.List(
            [
                DKM(_kmeans_centroids(k, w, self.bits), tau=tau, max_iter=max_iter, train_centroids=train_centroids)
                for k, (_, w) in zip(keys, kernels, strict=True)
            ]
        )

    def __call__(self, *args, **kwargs):
        graphdef, kernels, rest = nnx.split(self.model, KERNELS, ...)
        layers = dict(zip(self.names, self.layers, strict=True))
        clustered = []
        for path, var in nnx.to_flat_state(kernels):
            w = var.get_value()
            clustered.append((path, var.replace(layers[_name(path)](w.reshape(-1, 1)).reshape(w.shape))))
        model = nnx.merge(graphdef, nnx.from_flat_state(clustered), rest)
        out = model(*args, **kwargs)
        nnx.update(self.model, nnx.state(model, nnx.Not(KERNELS)))
        return out


def _kmeans_centroids(key, w, bits: int):
    return fit_kmeans(key, w.reshape(-1, 1).astype(jnp.float32), k=2**bits).centroids
