"""TurboQuant for the KV cache: a random rotation per head, Lloyd-Max levels, norms stored.

Each head vector x (hd) is coded as (optionally centred, optionally before RoPE)

    y = M ((x - mean) s), y = [y_out | y_reg]   (the `outliers` channels of largest calibration
                                                energy first, each part rotated by its own
                                                random rotation: M = blockdiag(R_out, R_reg) P)
    y_part ~ ||y_part|| c[idx],  idx = nearest Lloyd-Max level of y_part / ||y_part||

with the landed TurboQuant-mse codebooks (`vqlib.codebooks.fit_turboquant`: a dense Haar
rotation and the Lloyd-Max levels of a coordinate of a uniform unit vector in that part's
dimension); the outlier part gets one more bit. Norms are stored in float16 (counted).
Optional channel scales s (`channel_scale`), fitted on calibration: decoded x = M^T y / s + mean.

Attention reads codes in the rotated domain: a key tile scores q as (M (q / s)) . y~ + q . mean,
and values accumulate sum_s p_s y~_s, rotated back once per call (M^T acc / s + mass * mean; with
`mean_first`, position 0's score gets q . (mean_first - mean) and the values' accumulator one
more column, the probability position 0 got, times mean_first - mean). Keys quantised before
RoPE are decoded, rotated back and RoPE'd per tile instead.

Channel scales. The rotation spreads the coding error evenly over the channels of x s, so channel
c of x gets an error of variance ~ sigma^2 ||x s||^2 / (hd s_c^2), and the loss grows by about
sum_c F_c of that, F_c the diagonal Fisher (mean squared loss gradient) of channel c. Over s this
is smallest at s_c^2 = sqrt(F_c / K_c), K_c = E (x_c - mean_c)^2 (Cauchy-Schwarz), where it is
(sum_c sqrt(F_c K_c))^2 / (sum_c F_c sum_c K_c) of the unscaled error: measured on SmolLM2's
calibration keys before RoPE, 0.53 summed over layers and heads (0.85 for values). The error is
moved from the channels the queries read little into those they read much; s is normalised to a
geometric mean of 1 and stored per layer (float32, counted).

First-position centring (`mean_first`): from about the third layer on, the key and the value at
position 0 (the attention sink's) are each one nearly constant vector, whatever the token there
(SmolLM2-135M, keys before RoPE: 0.04 from their calibration mean against 16 from the other
positions' mean and 7-10 for a typical key's spread; values 0.03-0.05 against 2-5 and 5-9).
Centred on the common mean, the sink's key has the largest coding error of any key, and the
sink's value error enters every output with the sink's large attention weight. With
`mean_first`, position 0 is centred on its own calibration mean instead, and coded with the same
bits as every other position (no full-precision copy; the mean costs what the common one does).

Rotated-mean centring (`rope_mean`, keys). Keys before RoPE have large per-channel means, which
RoPE turns with the position: after RoPE one mean fits no position, and coding keys before RoPE
makes every read decode each key and rotate it back (a (hd, hd) product per key per tile). Keys
are instead coded after RoPE, centred on the pre-RoPE mean rotated to their position,
k_p - RoPE_p(mean) = RoPE_p(k_pre - mean): the same centred vector as before RoPE, turned by an
orthogonal map, so its norm and its coding error under the random rotation are the same. Channel
scales and outlier channels are taken per RoPE pair (c, c + hd/2), where they commute with RoPE
(the tied optimum: F and K summed over the pair). A key tile is then scored in the rotated domain
as post-RoPE codes are, plus q . RoPE_p(mean) = cos_p . a + sin_p . c with a = q * mean and
c = q * rotate_half(mean) (each folded to hd/2, cos and sin repeating over the halves).

`prod=True` (keys; the "turboquant_prod" variant, `fit_turboquant_prod`): (b - 1)-bit
TurboQuant-mse of the whole head plus a 1-bit QJL sketch of the residual with gamma = ||r||,
unbiased inner products: q . x ~ ||x|| ((M q) . c[idx] + sqrt(pi / 2) / hd gamma (S M^T M q) . z).

Bits per element: (hd - n_out) b + n_out (b + 1) + 16 per stored norm, over hd. The presets at
hd = 64 spend b + 0.5 bits per element averaged over keys and values (2.5 and 3.5): keys get 16
outlier channels at b + 1 bits and two norms (b + 0.75), values b bits and one norm (b + 0.25).

References:
    Zandieh, Daliri, Hadian & Mirrokni, "TurboQuant: online vector quantization with
    near-optimal distortion rate", arXiv 2504.19874, 2025.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vqlib._types import pytree_dataclass, static_field
from vqlib.codebooks import fit_turboquant, fit_turboquant_prod, pack_codes, rotate, unpack_codes
from vqlib.kernels import nearest_level
from vqlib.llm._config import LlamaConfig
from vqlib.llm._kv_engine import TileCodec, slice_positions, write_positions
from vqlib.llm._kv_rope import RopeTable, angles_at, rope_at
from vqlib.llm._model import rotate_half

_HIGHEST = lax.Precision.HIGHEST
SQRT_HALF_PI = math.sqrt(math.pi / 2)


@pytree_dataclass
class TurboQuantKVCodec(TileCodec):
    """TurboQuant codes of keys or values (see the module docstring).

    Attributes:
        matrix: per layer, (kvh, hd, hd) float32 orthogonal M (y = M x): outlier channels
            first, each part by its own random rotation.
        mean: per layer, (kvh, hd) float32 subtracted before coding (zeros: not centred).
        levels_out: (2**(bits + 1),) Lloyd-Max levels of the outlier part (unused when outliers = 0).
        levels_reg: (2**bits,) levels of the rest (bits - 1 of them with prod).
        sketch: per layer, (kvh, hd, hd) S M^T of the QJL sketch (prod), else ().
        config: the model's config (for RoPE).
        bits: bits per coordinate of the regular part.
        outliers: channels coded at bits + 1.
        pre_rope: keys coded before RoPE.
        prod: keys as TurboQuant-prod.
        centered: mean is the calibration mean (else zeros).
        rescale: store each part's least-squares scale <y, c> / ||c||^2 (c the chosen levels)
            instead of its norm ||y||: the same bits, a smaller error, and no 1 - D_mse
            shrinkage of the decoded vector (not with prod, whose unbiased estimate needs ||y||).
        scale: per layer, (kvh, hd) float32 channel scales s (see the module docstring), or ()
            for none.
        rope_table: with pre_rope, the angles of every position of the cache holding the codec
            (None outside a cache: then computed from config).
        mean_first: per layer, (kvh, hd) float32 subtracted at position 0 instead of `mean`, or
            () for none (module docstring).
        rope_mean: keys coded after RoPE, centred on the mean before RoPE rotated to each
            position, RoPE_p(mean) (module docstring); channel scales and outlier channels come
            in RoPE pairs, so the codes read like post-RoPE ones.
    """

    matrix: tuple
    mean: tuple
    levels_out: jax.Array
    levels_reg: jax.Array
    sketch: tuple = ()
    scale: tuple = ()
    mean_first: tuple = ()
    rope_table: RopeTable | None = None
    config: LlamaConfig = static_field(None)
    bits: int = static_field(3)
    outliers: int = static_field(0)
    pre_rope: bool = static_field(False)
    prod: bool = static_field(False)
    centered: bool = static_field(False)
    rescale: bool = static_field(False)
    rope_mean: bool = static_field(False)

    # ------------------------------------------------------------------ layout

    @property
    def reg_bits(self) -> int:
        return self.bits - 1 if self.prod else self.bits

    @property
    def num_norms(self) -> int:
        return 1 + (self.outliers > 0) + self.prod

    def init(self, batch, capacity, kvh, hd):
        n_reg = hd - self.outliers
        store = dict(
            reg=jnp.zeros((batch, capacity, kvh, -(-n_reg * max(self.reg_bits, 1) // 8)), jnp.uint8),
            norms=jnp.zeros((batch, capacity, kvh, self.num_norms), jnp.float16),
        )
        if self.outliers:
            store["out"] = jnp.zeros((batch, capacity, kvh, -(-self.outliers * (self.bits + 1) // 8)), jnp.uint8)
        if self.prod:
            store["signs"] = jnp.zeros((batch, capacity, kvh, -(-hd // 8)), jnp.uint8)
        return store

    def storage(self, kvh, hd):
        n_reg = hd - self.outliers
        bits = n_reg * self.reg_bits + self.outliers * (self.bits + 1) + self.prod * hd + 16 * self.num_norms
        # per layer: the means and the channel scales (float32) and the outlier channel order (a
        # byte each); the rotations are drawn from a seed and not counted
        fixed = kvh * hd * (4 * self.centered + (self.outliers > 0) + 4 * bool(self.scale) + 4 * bool(self.mean_first))
        return kvh * bits, float(fixed)

    # ------------------------------------------------------------------ coding

    def _mean_at(self, layer, start, size: int):
        """(1, size, kvh, hd) or (1, 1, kvh, hd): the mean subtracted at positions start .. start + size - 1."""
        mean = self.mean[layer][None, None]
        if self.rope_mean:
            mean = rope_at(self.rope_table, self.config, jnp.broadcast_to(mean, (1, size, *mean.shape[2:])), start)
        if not self.mean_first:
            return mean
        first = self._is_first(start, size)[None, :, None, None]
        return jnp.where(first, self.mean_first[layer][None, None], mean)

    @property
    def _reads_rotated(self) -> bool:
        """Values mixed in the rotated domain (else through `dequant`)."""
        return not (self.pre_rope or self.prod)

    def _is_first(self, start, size: int):
        """(size,) bool: position 0 among positions start .. start + size - 1."""
        return start + jnp.arange(size, dtype=jnp.int32) == 0

    def acc_dim(self, hd: int) -> int:
        # with mean_first, one more column carries the probability the codec gave position 0
        return hd + bool(self.mean_first and self._reads_rotated)

    def _to_coded_domain(self, layer, x, start):
        if self.pre_rope:
            x = rope_at(self.rope_table, self.config, x, start, inverse=True)
        x = x - self._mean_at(layer, start, x.shape[1])
        if self.scale:
            x = x * self.scale[layer][None, None]
        return jnp.einsum("khd,btkd->btkh", self.matrix[layer], x, precision=_HIGHEST)

    def _unscale(self, layer, x):
        """x / s over the last axis (channels), x (b, s, kvh, hd) or (b, kvh, g, t, hd)."""
        if not self.scale:
            return x
        s = self.scale[layer]  # (kvh, hd)
        return x / (s[None, None] if x.ndim == 4 else s[None, :, None, None, :])

    def write(self, layer, store, x, start, recent):
        y = self._to_coded_domain(layer, x, start)
        n_out = self.outliers
        parts = [(y[..., n_out:], self.levels_reg, "reg", self.reg_bits)]
        if n_out:
            parts.insert(0, (y[..., :n_out], self.levels_out, "out", self.bits + 1))
        new, norms, unit_hat = dict(store), [], []
        for part, levels, name, bits in parts:
            norm = jnp.linalg.norm(part, axis=-1, keepdims=True)
            unit = part / jnp.where(norm > 0, norm, 1.0)
            idx = nearest_level(unit, levels)
            if bits:  # bits 0 (prod at 1 bit): no levels stored
                new[name] = write_positions(store[name], pack_codes(idx, bits), start)
            c = jnp.take(levels, idx)
            if self.rescale:  # argmin_s ||y - s c||: s = ||y|| <u, c> / ||c||^2
                cc = jnp.sum(c * c, axis=-1, keepdims=True)
                norm = norm * jnp.sum(unit * c, axis=-1, keepdims=True) / jnp.where(cc > 0, cc, 1.0)
            norms.append(norm)
            unit_hat.append(c)
        if self.prod:
            u = y / jnp.where(norms[-1] > 0, norms[-1], 1.0)
            residual = u - unit_hat[-1]
            gamma = jnp.linalg.norm(residual, axis=-1, keepdims=True)
            signs = jnp.einsum("khd,btkd->btkh", self.sketch[layer], residual, precision=_HIGHEST) >= 0
            new["signs"] = write_positions(store["signs"], pack_codes(signs.astype(jnp.int32), 1), start)
            norms.append(gamma)
        new["norms"] = write_positions(store["norms"], jnp.concatenate(norms, axis=-1), start)
        return new

    def _levels(self, store, start, size):
        """The tile's levels in the rotated domain, per part before its norm: [(b, size, kvh,
        n_out) outlier part,] (b, size, kvh, hd - n_out) regular part; and the norms (b, size,
        kvh, num_norms) float32, the outlier part's first."""
        norms = slice_positions(store["norms"], start, size).astype(jnp.float32)
        n_out = self.outliers
        hd = self.matrix[0].shape[-1]
        parts = []
        if n_out:
            idx = unpack_codes(slice_positions(store["out"], start, size), self.bits + 1, n_out)
            parts.append(jnp.take(self.levels_out, idx))
        if self.reg_bits:
            idx = unpack_codes(slice_positions(store["reg"], start, size), self.reg_bits, hd - n_out)
            parts.append(jnp.take(self.levels_reg, idx))
        else:
            parts.append(jnp.zeros((*norms.shape[:-1], hd - n_out), jnp.float32))
        return parts, norms

    def _rotated(self, store, start, size):
        """(b, size, kvh, hd) decoded tile in the rotated domain, and the norms (b, size, kvh, n)."""
        parts, norms = self._levels(store, start, size)
        scaled = [part * norms[..., i : i + 1] for i, part in enumerate(parts)]
        return jnp.concatenate(scaled, axis=-1) if len(scaled) > 1 else scaled[0], norms

    def _signs(self, store, start, size, hd):
        return 2.0 * unpack_codes(slice_positions(store["signs"], start, size), 1, hd).astype(jnp.float32) - 1.0

    def dequant(self, layer, store, start, size):
        y, norms = self._rotated(store, start, size)
        hd = y.shape[-1]
        if self.prod:  # + ||x|| sqrt(pi/2)/hd gamma (S M^T)^T z, in the rotated domain
            z = self._signs(store, start, size, hd)
            back = jnp.einsum("khd,bskh->bskd", self.sketch[layer], z, precision=_HIGHEST)
            y = y + (SQRT_HALF_PI / hd) * (norms[..., 0:1] * norms[..., -1:]) * back
        x = jnp.einsum("khd,bskh->bskd", self.matrix[layer], y, precision=_HIGHEST)
        x = self._unscale(layer, x) + self._mean_at(layer, start, size)
        return rope_at(self.rope_table, self.config, x, start) if self.pre_rope else x

    def for_capacity(self, capacity):
        if not (self.pre_rope or self.rope_mean):
            return self
        return dataclasses.replace(self, rope_table=RopeTable.build(self.config, capacity))

    def prepare(self, layer, q):
        if self.pre_rope:
            return q
        q_rot = jnp.einsum("khd,bkgtd->bkgth", self.matrix[layer], self._unscale(layer, q), precision=_HIGHEST)
        q_mean = self._query_mean(layer, q)
        q_sketch = jnp.einsum("khd,bkgtd->bkgth", self.sketch[layer], q_rot, precision=_HIGHEST) if self.prod else None
        q_first = None
        if self.mean_first:  # q . (mean_first - mean): position 0's score on top of q . mean
            q_first = jnp.einsum("bkgtd,kd->bkgt", q, self.mean_first[layer] - self.mean[layer], precision=_HIGHEST)
        return q_rot, q_mean, q_sketch, q_first

    def _query_mean(self, layer, q):
        """What q . mean needs: (b, kvh, g, t) q . mean, or with rope_mean the two (b, kvh, g, t,
        hd/2) vectors a, c of q . RoPE_p(mean) = cos_p . a + sin_p . c (cos and sin repeat over
        the two halves of a head, so each vector is folded to one half)."""
        mean = self.mean[layer]
        if not self.rope_mean:
            return jnp.einsum("bkgtd,kd->bkgt", q, mean, precision=_HIGHEST)
        return tuple(_fold_halves(q * m[None, :, None, None, :]) for m in (mean, rotate_half(mean)))

    def _mean_scores(self, q_mean, start, size: int):
        """(b, kvh, g, t, size or 1): q . (the mean at each position)."""
        if not self.rope_mean:
            return q_mean[..., None]
        a, c = q_mean
        cos, sin = angles_at(self.rope_table, self.config, start, size)
        half = a.shape[-1]
        return jnp.einsum("bkgtf,sf->bkgts", a, cos[:, :half], precision=_HIGHEST) + jnp.einsum(
            "bkgtf,sf->bkgts", c, sin[:, :half], precision=_HIGHEST
        )

    def scores(self, layer, store, qstate, start, size):
        if self.pre_rope:
            return TileCodec.scores(self, layer, store, qstate, start, size)
        q_rot, q_mean, q_sketch, q_first = qstate
        parts, norms = self._levels(store, start, size)
        # per part q . levels, times the part's norm per position (not per element)
        s = self._mean_scores(q_mean, start, size)
        done = 0
        for i, part in enumerate(parts):
            width = part.shape[-1]
            dots = jnp.einsum("bkgth,bskh->bkgts", q_rot[..., done : done + width], part, precision=_HIGHEST)
            s = s + dots * _per_position(norms[..., i])
            done += width
        if q_first is not None:
            s = s + jnp.where(self._is_first(start, size), q_first[..., None], 0.0)
        if self.prod:
            hd = q_rot.shape[-1]
            z = self._signs(store, start, size, hd)
            weight = (SQRT_HALF_PI / hd) * norms[..., 0] * norms[..., -1]  # (b, size, kvh)
            sk = jnp.einsum("bkgth,bskh->bkgts", q_sketch, z, precision=_HIGHEST)
            s = s + sk * _per_position(weight)
        return s

    def mix(self, layer, store, probs, start, size):
        if not self._reads_rotated:
            return TileCodec.mix(self, layer, store, probs, start, size)
        parts, norms = self._levels(store, start, size)
        # each part's norm folded into the probabilities (per position, not per element)
        acc = [
            jnp.einsum("bkgts,bskh->bkgth", probs * _per_position(norms[..., i]), part, precision=_HIGHEST)
            for i, part in enumerate(parts)
        ]
        acc = jnp.concatenate(acc, axis=-1) if len(acc) > 1 else acc[0]
        if not self.mean_first:
            return acc
        first = jnp.sum(jnp.where(self._is_first(start, size), probs, 0.0), axis=-1)
        return jnp.concatenate([acc, first[..., None]], axis=-1)

    def finish(self, layer, acc, mass):
        if not self._reads_rotated:
            return acc
        hd = self.matrix[layer].shape[-1]
        rotated = acc[..., :hd]
        back = self._unscale(layer, jnp.einsum("khd,bkgth->bkgtd", self.matrix[layer], rotated, precision=_HIGHEST))
        back = back + mass[..., None] * self.mean[layer][None, :, None, None, :]
        if self.mean_first:  # position 0 was centred on mean_first: add the difference for its share
            back = back + acc[..., hd:] * (self.mean_first[layer] - self.mean[layer])[None, :, None, None, :]
        return back


# ----------------------------------------------------------------------------- fitting


def _dense(rotation, d: int) -> jax.Array:
    """The (d, d) matrix R of a landed Rotation (rotate(rot, x) = R x)."""
    return rotate(rotation, jnp.eye(d, dtype=jnp.float32)).T


def fit_turboquant_codec(
    key,
    config: LlamaConfig,
    samples,
    *,
    bits: int,
    outliers: int = 0,
    pre_rope: bool = False,
    center: bool = False,
    prod: bool = False,
    rescale: bool = False,
    sensitivity=None,
    first_samples=None,
    rope_mean: bool = False,
) -> TurboQuantKVCodec:
    """Draws the rotations (per layer and head) and picks outlier channels and means from samples.

    Args:
        key: PRNG key of the rotations.
        config: the model's config.
        samples: per layer, (n, kvh, hd) float32 vectors in the coded domain (before RoPE when
            pre_rope), or None: then outliers must be 0 and center False (data-oblivious).
        bits: bits per coordinate of the regular channels (total bits with prod).
        outliers: channels per head at bits + 1, those of largest mean square in the samples.
        pre_rope: code keys before RoPE.
        center: subtract the samples' per-channel mean before coding.
        prod: TurboQuant-prod (keys): bits - 1 bits of levels plus a 1-bit residual sketch.
        rescale: store least-squares scales instead of norms (see TurboQuantKVCodec).
        sensitivity: per layer, (n, kvh, hd) squared loss gradients aligned with samples (the
            diagonal Fisher): fit channel scales s = (F / K)^(1/4) (module docstring); None: none.
        first_samples: per layer, (m, kvh, hd) vectors at position 0 (in the coded domain, as
            samples; samples then hold the other positions only): position 0 is centred on their
            mean (`mean_first`); None: on the common mean.
        rope_mean: keys coded after RoPE, centred on RoPE_p(mean) at position p; samples (and
            sensitivity, first_samples) are keys before RoPE; channel scales and outlier
            channels in RoPE pairs (c, c + hd/2), so that both commute with RoPE.
    """
    kvh, hd, num_layers = config.num_kv_heads, config.head_dim, config.num_layers
    if prod and rescale:
        raise ValueError("prod's inner products are unbiased only with the stored norms: pass rescale=False with prod")
    n_out = 0 if prod else outliers
    if rope_mean and (pre_rope or not center):
        raise ValueError(
            "rope_mean centres post-RoPE keys on a rotated pre-RoPE mean: pass center=True and pre_rope=False"
        )
    if rope_mean and n_out % 2:
        raise ValueError(f"rope_mean picks outlier channels in RoPE pairs: pass an even outliers, got {outliers}")
    if first_samples is not None and not center:
        raise ValueError("first_samples centres position 0 on its own mean: pass center=True with it")
    if samples is None and (n_out or center or sensitivity is not None):
        raise ValueError(
            "outlier channels, centring and channel scales are fitted on calibration samples; pass calibration"
        )
    if hd - n_out < 2 or (n_out and n_out < 2):
        raise ValueError(
            f"outliers={outliers} leaves parts of {n_out} and {hd - n_out} channels of head_dim={hd}; each "
            "rotated part needs at least 2 channels: pass 2 <= outliers <= head_dim - 2 (or 0)"
        )
    keys = jax.random.split(key, num_layers * kvh).reshape(num_layers, kvh)
    dummy = jnp.zeros((1, hd), jnp.float32)
    fit = fit_turboquant_prod if prod else fit_turboquant
    reg_cb = fit(keys[0, 0], dummy[:, : hd - n_out], bits=bits)
    levels_reg = (reg_cb.mse if prod else reg_cb).centroids
    levels_out = fit_turboquant(keys[0, 0], dummy[:, :n_out], bits=bits + 1).centroids if n_out else levels_reg
    matrices, means, sketches, scales = [], [], [], []
    firsts = () if first_samples is None else tuple(
        jnp.asarray(np.asarray(f, np.float32).mean(axis=0)) for f in first_samples
    )  # fmt: skip
    for layer in range(num_layers):
        x = None if samples is None else np.asarray(samples[layer], np.float32)
        mu = x.mean(axis=0) if (center and x is not None) else np.zeros((kvh, hd), np.float32)
        s = np.ones((kvh, hd), np.float32)
        if sensitivity is not None:
            s = channel_scales(x - mu, np.asarray(sensitivity[layer], np.float32), pairs=rope_mean)
            scales.append(jnp.asarray(s))
        mats, sks = [], []
        for h in range(kvh):
            k_out, k_reg = jax.random.split(keys[layer, h])
            if n_out:
                energy = (((x[:, h] - mu[h]) * s[h]) ** 2).mean(axis=0)
                order = _pair_order(energy) if rope_mean else np.argsort(-energy, kind="stable")
            else:
                order = np.arange(hd)
            perm = np.eye(hd, dtype=np.float32)[order]  # rows: the chosen channel order
            blocks = []
            if n_out:
                blocks.append(_dense(fit_turboquant(k_out, dummy[:, :n_out], bits=bits + 1).rotation, n_out))
            cb = fit(k_reg, dummy[:, : hd - n_out], bits=bits)
            blocks.append(_dense((cb.mse if prod else cb).rotation, hd - n_out))
            mats.append(jax.scipy.linalg.block_diag(*blocks) @ perm)
            if prod:
                sks.append(cb.qjl.projection @ mats[-1].T)  # S acts on the rotated residual: S M^T
        matrices.append(jnp.stack(mats))
        means.append(jnp.asarray(mu))
        if prod:
            sketches.append(jnp.stack(sks))
    return TurboQuantKVCodec(
        tuple(matrices), tuple(means), jnp.asarray(levels_out), jnp.asarray(levels_reg), tuple(sketches),
        tuple(scales), firsts, config=config, bits=bits, outliers=n_out, pre_rope=pre_rope, prod=prod,
        centered=bool(center), rescale=rescale, rope_mean=rope_mean,
    )  # fmt: skip


def _per_position(w):
    """(b, size, kvh) per-position weights -> (b, kvh, 1, 1, size), to scale (b, kvh, g, t, size) scores."""
    return w.transpose(0, 2, 1)[:, :, None, None, :]


def _fold_halves(x):
    """(..., hd) -> (..., hd/2): each RoPE pair (c, c + hd/2) summed."""
    half = x.shape[-1] // 2
    return x[..., :half] + x[..., half:]


def _pair_order(energy: np.ndarray) -> np.ndarray:
    """Channels by decreasing energy of their RoPE pair (c, c + hd/2), a pair's two channels together."""
    pairs = np.argsort(-_fold_halves(energy), kind="stable")
    return np.stack([pairs, pairs + len(pairs)], axis=-1).reshape(-1)


def channel_scales(x: np.ndarray, fisher: np.ndarray, *, pairs: bool = False) -> np.ndarray:
    """Scales s (kvh, hd) minimising the Fisher-weighted error of rotated coding (module
    docstring): s_c^2 = sqrt(F_c / K_c) from x (n, kvh, hd) (centred) and fisher (n, kvh, hd),
    with F and K floored at 1e-6 of their head's mean (a channel never read or never used gets
    no infinite or zero scale), normalised to a geometric mean of 1 per head. pairs: one scale
    per RoPE pair (c, c + hd/2), the optimum under that constraint (F and K summed over the pair)."""
    if x.shape != fisher.shape:
        raise ValueError(f"sensitivity has shape {fisher.shape}, the samples {x.shape}: pass aligned calibration")
    k = np.mean(np.square(x, dtype=np.float64), axis=0)
    f = np.mean(fisher.astype(np.float64), axis=0)
    if pairs:
        k, f = (np.tile(_fold_halves(a), 2) for a in (k, f))
    k = np.maximum(k, 1e-6 * k.mean(axis=-1, keepdims=True) + 1e-30)
    f = np.maximum(f, 1e-6 * f.mean(axis=-1, keepdims=True) + 1e-30)
    log_s = 0.25 * (np.log(f) - np.log(k))
    return np.exp(log_s - log_s.mean(axis=-1, keepdims=True)).astype(np.float32)
