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
import numpy as np
from flax import nnx

from vqlib._types import VALIDATORS, pytree_dataclass, static_field
from vqlib.codebooks import pack_codes, unpack_codes
from vqlib.kernels import assign as assign_op
from vqlib.nn._common import KERNELS, MAX_BITS, _check_bits, _check_kernel_sizes, _kernels, _name
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


def validate(palettized: PalettizedModel) -> None:
    """The invariants `vqlib.load` checks on a PalettizedModel it rebuilds (ValueError naming the
    field): bits in 1..8; one (name, shape) per kernel, the same names in codes and codebooks and
    none of them in rest; per kernel a finite float codebook of 2**bits values and exactly the
    uint8 bytes its packed codes take (every b-bit code then indexes the codebook)."""
    bits = palettized.bits
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int from 1 to {MAX_BITS}, got {bits!r}")
    shapes = palettized.shapes
    if not isinstance(shapes, tuple) or not all(
        isinstance(entry, tuple)
        and len(entry) == 2
        and isinstance(entry[0], str)
        and isinstance(entry[1], tuple)
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in entry[1])
        for entry in shapes
    ):
        raise ValueError(f"shapes must be ((kernel name, shape of non-negative ints), ...), got {str(shapes)[:120]}")
    names = [name for name, _ in shapes]
    if len(set(names)) != len(names):
        raise ValueError(f"shapes names a kernel twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    for field in ("codes", "codebooks", "rest"):
        if not isinstance(getattr(palettized, field), dict):
            raise ValueError(f"{field} must be a dict of arrays, got {type(getattr(palettized, field)).__name__}")
    if set(palettized.codes) != set(names) or set(palettized.codebooks) != set(names):
        raise ValueError(
            f"codes {sorted(palettized.codes)} and codebooks {sorted(palettized.codebooks)} must name the kernels "
            f"of shapes {sorted(names)}"
        )
    if set(palettized.rest) & set(names):
        raise ValueError(f"variables {sorted(set(palettized.rest) & set(names))} are both kernels and rest")
    for name, shape in shapes:
        codebook, codes = palettized.codebooks[name], palettized.codes[name]
        if not jnp.issubdtype(codebook.dtype, jnp.floating) or codebook.shape != (2**bits,):
            raise ValueError(
                f"codebooks[{name!r}] must be {2**bits} float values (2**bits), got {codebook.dtype} {codebook.shape}"
            )
        if not np.isfinite(np.asarray(codebook, np.float32)).all():
            raise ValueError(f"codebooks[{name!r}] holds NaN or inf values")
        packed = -(-math.prod(shape) * bits // 8)
        if codes.dtype != jnp.uint8 or codes.shape != (packed,):
            raise ValueError(
                f"codes[{name!r}] must be ({packed},) uint8 ({math.prod(shape)} weights of shape {shape} at "
                f"{bits} bits), got {codes.dtype} {codes.shape}"
            )


VALIDATORS[PalettizedModel] = validate
