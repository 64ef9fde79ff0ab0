"""Palettised models: every kernel stored as b-bit codes into its own codebook of 2**b values.

`export_palettized` turns a trained `DKMPalettizer` into a `PalettizedModel` (per kernel: packed
codes and a codebook; every other variable as is), which `vqlib.save` writes and
`load_palettized` turns back into a model. `palettize_kmeans` is the post-training baseline:
k-means on each kernel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vqlib._types import pytree_dataclass, static_field
from vqlib.codebooks import pack_codes, unpack_codes
from vqlib.kernels import assign as assign_op
from vqlib.nn._common import KERNELS, _check_bits, _check_kernel_sizes, _kernels, _name
from vqlib.nn._dkm import DKMPalettizer, _kmeans_centroids


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
