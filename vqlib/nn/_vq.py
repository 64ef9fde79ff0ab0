"""The VQ-VAE layer: nearest-code forward with a straight-through or rotation-trick gradient,
commitment loss, an EMA, learned or linearly reparameterised (SimVQ) codebook, and usage statistics."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from vqlib import _checks
from vqlib.nn._common import QuantizerState
from vqlib.nn._vq_math import EMACodebook, ema_init, ema_update, restart_dead_codes, vector_quantize

CODEBOOKS = ("ema", "learned", "linear")


class VectorQuantizer(nnx.Module):
    """A VQ-VAE quantization layer: nearest code forward, straight-through (or rotation-trick)
    gradient, commitment loss, usage statistics (`vqlib.nn.vector_quantize`).

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
