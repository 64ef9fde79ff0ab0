"""Flax nnx layers around the codebook math: a DKM weight clusterer, a model-wide palettiser with
export to codes + codebooks, and a VQ-VAE quantization layer.

Every layer trains with any optax optimizer through `nnx.Optimizer(model, tx, wrt=nnx.Param)`
inside an `nnx.jit` train step. State a layer updates in its own forward pass (DKM's warm-started
centroids, an EMA codebook, step counters) is a `QuantizerState` variable, which optimizers
filtering on `nnx.Param` leave alone. Layers follow nnx's train / eval switch: `model.eval()`
sets `deterministic=True`, and then DKM layers cluster hard (every weight replaced by its nearest
centroid, exactly what `export_palettized` stores) and VQ layers stop updating their codebooks.

Palettisation: `DKMPalettizer(model, bits=b)` wraps any nnx model and, in each forward pass,
replaces every kernel (the `nnx.Param`s named "kernel": `nnx.Linear`, `nnx.Conv`, ...) by its DKM
clustering into 2**b values, so fine-tuning with the usual loss teaches the weights to cluster.
`export_palettized` turns it into a `PalettizedModel` (per kernel: b-bit packed codes and a 2**b
codebook; every other variable as is), which `vqlib.save` writes and `load_palettized` turns
back into a model. `palettize_kmeans` is the post-training baseline: k-means on each kernel.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vqlib import _checks
from vqlib._types import pytree_dataclass, static_field
from vqlib.codebooks._dkm import check_tau, dkm
from vqlib.codebooks._kmeans import fit_kmeans
from vqlib.codebooks._packing import pack_codes, unpack_codes
from vqlib.codebooks._vq_layer import EMACodebook, ema_init, ema_update, restart_dead_codes, vector_quantize
from vqlib.kernels import assign as assign_op

MAX_BITS = 8
KERNELS = nnx.All(nnx.Param, nnx.PathContains("kernel"))
CODEBOOKS = ("ema", "learned", "linear")


class QuantizerState(nnx.Variable):
    """State a vqlib layer updates in its own forward pass; not an `nnx.Param`, so not trained."""


def _nearest(w, centroids):
    """(n, d) -> (n, d): each row replaced by its nearest centroid."""
    return jnp.take(centroids, assign_op(w, centroids)[0], axis=0)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int from 1 to {MAX_BITS} (2 to {2**MAX_BITS} kernel values), got {bits!r}")
    return bits


def _name(path) -> str:
    return "/".join(map(str, path))


def _kernels(model) -> list[tuple[str, jax.Array]]:
    """(name, value) of every kernel of `model`, in nnx's (sorted) state order."""
    return [(_name(path), var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, KERNELS))]


def _check_kernel_sizes(kernels, bits: int) -> None:
    if not kernels:
        raise ValueError("the model has no kernels (nnx.Param named 'kernel', as in nnx.Linear and nnx.Conv)")
    for name, w in kernels:
        if w.size < 2**bits:
            raise ValueError(
                f"kernel {name} has {w.size} weights, fewer than the 2**bits={2**bits} values of {bits}-bit "
                f"palettisation; use bits <= {int(math.log2(w.size)) if w.size else 0}"
            )


# ----------------------------------------------------------------------------- DKM


class DKM(nnx.Module):
    """Differentiable k-means of one weight tensor (`vqlib.codebooks.dkm`), holding its centroids.

    Training (`deterministic=False`): `layer(w)` returns the soft DKM reconstruction of w (n, d)
    after `num_iters` attention updates of the centroids, differentiable in w. Unless
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

    def __init__(self, centroids, *, tau: float | Callable = 0.01, num_iters: int = 3, train_centroids: bool = False):
        centroids = _checks.check_float_array(centroids, "centroids", ndim=2).astype(jnp.float32)
        if not callable(tau):
            check_tau(tau)
        self.num_iters = _checks.check_int(num_iters, "num_iters", low=0)
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
        w_soft, c_new = dkm(w, start, tau=tau * scale, num_iters=self.num_iters)
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
        num_iters: DKM iterations per forward pass.
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
        num_iters: int = 3,
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
                DKM(_kmeans_centroids(k, w, self.bits), tau=tau, num_iters=num_iters, train_centroids=train_centroids)
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


# ----------------------------------------------------------------------------- export


@pytree_dataclass
class PalettizedModel:
    """A model with every kernel stored as b-bit codes into its own codebook of 2**b values.

    Attributes:
        codes: kernel name -> (ceil(size * bits / 8),) uint8, the kernel's codes in row-major
            order, packed by `vqlib.codebooks.pack_codes`.
        codebooks: kernel name -> (2**bits,) float32 values.
        rest: name -> array, every other variable of the model (biases, norm scales, batch
            statistics, RNG state), unquantized.
        shapes: ((kernel name, shape), ...) the kernels' shapes.
        bits: bits per kernel weight.
    """

    codes: dict
    codebooks: dict
    rest: dict
    shapes: tuple = static_field()
    bits: int = static_field()


def _palettized(model, centroids: dict, bits: int) -> PalettizedModel:
    """Codes every kernel by its nearest value in centroids[name] ((2**bits, 1) each)."""
    codes, codebooks, shapes = {}, {}, []
    for name, w in _kernels(model):
        c = jnp.asarray(centroids[name], jnp.float32)
        kernel_codes = assign_op(w.reshape(-1, 1).astype(jnp.float32), c)[0]
        codes[name] = pack_codes(kernel_codes[None], bits)[0]
        codebooks[name] = c[:, 0]
        shapes.append((name, tuple(w.shape)))
    rest = {_name(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Not(KERNELS)))}
    return PalettizedModel(codes=codes, codebooks=codebooks, rest=rest, shapes=tuple(shapes), bits=bits)


def palettize_kmeans(model, *, bits: int, key=None) -> PalettizedModel:
    """Post-training palettisation: each kernel's weights clustered by k-means into 2**bits values.

    Args:
        model: an nnx model; its kernels are the `nnx.Param`s named "kernel".
        bits: bits per weight, 1 to 8.
        key: PRNG key for k-means++; defaults to `jax.random.key(0)`.

    Returns:
        A `PalettizedModel`; `load_palettized(model, p)` rebuilds the model from it.

    Example:
        >>> import vqlib
        >>> from flax import nnx
        >>> p = vqlib.nn.palettize_kmeans(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), bits=3)
        >>> p.codes["kernel"].shape, p.codebooks["kernel"].shape      # 128 weights x 3 bits = 48 bytes
        ((48,), (8,))
    """
    bits = _check_bits(bits)
    kernels = _kernels(model)
    _check_kernel_sizes(kernels, bits)
    keys = jax.random.split(jax.random.key(0) if key is None else key, len(kernels))
    centroids = {name: _kmeans_centroids(k, w, bits) for k, (name, w) in zip(keys, kernels, strict=True)}
    return _palettized(model, centroids, bits)


def export_palettized(palettizer: DKMPalettizer) -> PalettizedModel:
    """The compressed form of a fine-tuned `DKMPalettizer`: each kernel coded by its nearest DKM
    centroid (what the palettizer computes in eval mode), plus the wrapped model's other variables.

    Example: see `DKMPalettizer`.
    """
    if not isinstance(palettizer, DKMPalettizer):
        raise TypeError(f"export_palettized expects a vqlib.nn.DKMPalettizer, got {type(palettizer).__name__}")
    layers = zip(palettizer.names, palettizer.layers, strict=True)
    centroids = {name: layer.centroids.get_value() for name, layer in layers}
    return _palettized(palettizer.model, centroids, palettizer.bits)


def load_palettized(model, palettized: PalettizedModel):
    """A new model with `model`'s structure and the kernels and variables stored in `palettized`.

    Args:
        model: an instance of the architecture that was palettised (its values are not used).
        palettized: from `palettize_kmeans`, `export_palettized` or `vqlib.load`.

    Returns:
        A new nnx model (`model` is unchanged) whose kernels hold codebook[codes] in the kernels'
        dtypes.

    Example:
        >>> import jax.numpy as jnp, vqlib
        >>> from flax import nnx
        >>> model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
        >>> small = vqlib.nn.load_palettized(model, vqlib.nn.palettize_kmeans(model, bits=1))
        >>> len(jnp.unique(small.kernel[...])), bool(jnp.all(small.bias[...] == model.bias[...]))
        (2, True)
    """
    if not isinstance(palettized, PalettizedModel):
        raise TypeError(f"palettized must be a vqlib.nn.PalettizedModel, got {type(palettized).__name__}")
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    names = {_name(path) for path, _ in flat}
    stored = set(palettized.codes) | set(palettized.rest)
    if names != stored:
        raise ValueError(
            f"the model does not match the palettized one: variables only in the model {sorted(names - stored)}, "
            f"only in the file {sorted(stored - names)}; build the model with the architecture that was palettised"
        )
    shapes = dict(palettized.shapes)
    values = []
    for path, var in flat:
        name, old = _name(path), var.get_value()
        if name in palettized.codes:
            size = math.prod(shapes[name])
            codes = unpack_codes(palettized.codes[name][None], palettized.bits, size)[0]
            new = jnp.take(palettized.codebooks[name], codes).reshape(shapes[name]).astype(old.dtype)
        else:
            new = palettized.rest[name]
        if jnp.shape(new) != jnp.shape(old):
            raise ValueError(f"variable {name} has shape {jnp.shape(old)} in the model but {jnp.shape(new)} stored")
        values.append((path, var.replace(new)))
    return nnx.merge(graphdef, nnx.from_flat_state(values))


# ----------------------------------------------------------------------------- VQ layer


class VectorQuantizer(nnx.Module):
    """A VQ-VAE quantization layer: nearest code forward, straight-through (or rotation-trick)
    gradient, commitment loss, usage statistics (`vqlib.codebooks.vector_quantize`).

    Codebook kinds:
    - "ema": codes follow exponential moving averages of their clusters (`ema_update`), with
      dead-code restart from the batch when `dead_code_threshold` > 0 (`restart_dead_codes`);
      the codebook is a `QuantizerState`, not trained by the optimizer.
    - "learned": the codebook is an `nnx.Param` trained by the codebook loss.
    - "linear" (SimVQ): codebook = basis @ projection, a frozen random basis (k, d) with entries
      of variance 1/d and a learned (d, d) projection starting at the identity.

    Codes start as standard normal draws (basis: variance 1/d). `layer(z)` takes z (..., d) and
    returns (z_q (..., d), codes (...) int32, `VQStats`); add `stats.loss` to the training loss.
    In training the EMA codebook updates after the codes are chosen: z_q is from the codebook as
    it was.

    Args:
        num_codes: k >= 1.
        dim: d, the vector size.
        rngs: `nnx.Rngs` for the initial codes.
        codebook: "ema", "learned" or "linear".
        commitment_cost: beta, weight of the commitment loss in `stats.loss`.
        decay: EMA decay in [0, 1) ("ema").
        dead_code_threshold: restart codes whose EMA count (vectors per batch) falls below it;
            0 disables ("ema" only).
        rotation_trick: pass gradients by the rotation trick instead of straight through.

    Example:
        >>> import jax, vqlib
        >>> from flax import nnx
        >>> vq = vqlib.nn.VectorQuantizer(16, 4, rngs=nnx.Rngs(0), dead_code_threshold=1.0)
        >>> z = jax.random.normal(jax.random.key(1), (8, 32, 4))   # e.g. 8 images of 32 latents
        >>> z_q, codes, stats = vq(z)
        >>> z_q.shape, codes.shape, stats.usage.shape
        ((8, 32, 4), (8, 32), (16,))
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        *,
        rngs: nnx.Rngs,
        codebook: str = "ema",
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        dead_code_threshold: float = 0.0,
        rotation_trick: bool = False,
    ):
        num_codes = _checks.check_int(num_codes, "num_codes", low=1)
        dim = _checks.check_int(dim, "dim", low=1)
        if codebook not in CODEBOOKS:
            raise ValueError(f"codebook must be one of {CODEBOOKS}, got {codebook!r}")
        if not _checks.check_nonnegative_float(decay, "decay") < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}; 0.99 is the usual value")
        self.dead_code_threshold = _checks.check_nonnegative_float(dead_code_threshold, "dead_code_threshold")
        if self.dead_code_threshold > 0 and codebook != "ema":
            raise ValueError(
                f"dead_code_threshold applies to codebook='ema' only, got codebook={codebook!r}; with 'linear' "
                "(SimVQ) every code moves with the projection, so none stays dead"
            )
        self.kind = codebook
        self.commitment_cost = _checks.check_nonnegative_float(commitment_cost, "commitment_cost")
        self.decay = float(decay)
        self.rotation_trick = bool(rotation_trick)
        self.deterministic = False
        init = jax.random.normal(rngs.params(), (num_codes, dim), jnp.float32)
        if codebook == "ema":
            self.ema = QuantizerState(ema_init(init))
        elif codebook == "learned":
            self.codebook = nnx.Param(init)
        else:
            self.basis = QuantizerState(init / math.sqrt(dim))
            self.projection = nnx.Param(jnp.eye(dim, dtype=jnp.float32))

    def current_codebook(self):
        """The (k, d) codebook in use."""
        if self.kind == "ema":
            return jax.lax.stop_gradient(self.ema.get_value().codebook)
        if self.kind == "learned":
            return self.codebook.get_value()
        return jnp.dot(self.basis.get_value(), self.projection.get_value(), precision=jax.lax.Precision.HIGHEST)

    def __call__(self, z):
        d = self.current_codebook().shape[1]
        _checks.check_dim(z, d, "z", what="the codebook has")
        flat = z.reshape(-1, d)
        out, codes, stats = vector_quantize(
            flat, self.current_codebook(), commitment_cost=self.commitment_cost, rotation_trick=self.rotation_trick
        )
        if self.kind == "ema" and not self.deterministic:
            state: EMACodebook = ema_update(self.ema.get_value(), flat, codes, decay=self.decay)
            if self.dead_code_threshold > 0:
                state, restarted = restart_dead_codes(state, flat, threshold=self.dead_code_threshold)
                stats = dataclasses.replace(stats, num_restarted=restarted)
            self.ema.set_value(state)
        return out.reshape(z.shape), codes.reshape(z.shape[:-1]), stats
