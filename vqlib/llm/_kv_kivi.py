"""KIVI: asymmetric uniform quantisation, keys per channel, values per token.

Each group of G numbers is stored as b-bit codes plus a float16 scale and zero point:

    scale = (max - min) / (2**b - 1),  zero = min,  code = round((x - zero) / scale),  x~ = code * scale + zero

Keys are grouped along tokens (per channel, G consecutive tokens share a scale: the channel
outliers of keys stay within their channel); values along channels (per token, G consecutive
channels). Keys can be coded only once their G-token group is complete, so the cache keeps the
newest keys in full precision and flushes them R at a time (R a multiple of G, "block" rule);
values leave an R-token full-precision window one by one ("sliding" rule). R = 128, G = 32.

References:
    Liu et al., "KIVI: a tuning-free asymmetric 2bit quantization for KV cache", ICML 2024
    (arXiv 2402.02750).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from vqlib._types import pytree_dataclass, static_field
from vqlib.codebooks import pack_codes, unpack_codes
from vqlib.kernels import kivi_attend, kivi_attend_native_ready
from vqlib.llm._kv_engine import TileCodec, slice_positions, write_positions

BITS = (2, 4)


def quantize_groups(x, bits: int, axis: int):
    """Uniform asymmetric codes of x over `axis` (the group axis): (codes int32, scale f16, zero f16).

    scale and zero are rounded to float16 first and the codes computed from the rounded values,
    so dequantisation reproduces exactly what the codes were chosen against."""
    levels = 2**bits - 1
    lo = jnp.min(x, axis=axis, keepdims=True)
    hi = jnp.max(x, axis=axis, keepdims=True)
    zero = lo.astype(jnp.float16)
    scale = ((hi - lo) / jnp.float32(levels)).astype(jnp.float16)
    s32 = scale.astype(jnp.float32)
    safe = jnp.where(s32 > 0, s32, 1.0)
    codes = jnp.clip(jnp.round((x - zero.astype(jnp.float32)) / safe), 0, levels).astype(jnp.int32)
    return codes, scale, zero


def dequantize_groups(codes, scale, zero):
    return codes.astype(jnp.float32) * scale.astype(jnp.float32) + zero.astype(jnp.float32)


@pytree_dataclass
class KIVIKeyCodec(TileCodec):
    """Keys per channel over groups of `group` tokens; no fitted parameters."""

    bits: int = static_field(2)
    group: int = static_field(32)

    @property
    def padding(self) -> int:
        return 2 * self.group

    def init(self, batch, capacity, kvh, hd):
        n_groups = capacity // self.group
        return dict(
            codes=jnp.zeros((batch, capacity, kvh, hd * self.bits // 8), jnp.uint8),
            scale=jnp.zeros((batch, n_groups, kvh, hd), jnp.float16),
            zero=jnp.zeros((batch, n_groups, kvh, hd), jnp.float16),
        )

    def write(self, layer, store, x, start, recent):
        """Re-codes every group the new tokens touch, from the full-precision context `recent`
        (a group still incomplete is coded from what it has; it is re-coded once complete, and
        the block rule reads it in full precision until then)."""
        b, t, kvh, hd = x.shape
        G = self.group
        W = recent.shape[1] - t
        n_groups = (t + G - 2) // G + 1  # groups positions start .. start + t - 1 can touch
        first = start // G
        offset = W - (start - first * G)  # index of position first * G in `recent`
        padded = jnp.concatenate([recent, jnp.zeros((b, n_groups * G, kvh, hd), jnp.float32)], axis=1)
        xs = lax.dynamic_slice_in_dim(padded, offset, n_groups * G, axis=1).reshape(b, n_groups, G, kvh, hd)
        codes, scale, zero = quantize_groups(xs, self.bits, axis=2)
        packed = pack_codes(codes.reshape(b, n_groups * G, kvh, hd), self.bits)
        return dict(
            codes=write_positions(store["codes"], packed, first * G),
            scale=write_positions(store["scale"], scale[:, :, 0], first),
            zero=write_positions(store["zero"], zero[:, :, 0], first),
        )

    def native_reader(self, value_codec, head_dim):
        paired = isinstance(value_codec, KIVIValueCodec) and value_codec.bits == self.bits
        if not paired or value_codec.group != self.group or not kivi_attend_native_ready(head_dim, self.group):
            return None

        def read(kstore, vstore, q, lo, hi):
            return kivi_attend(
                q, kstore["codes"], kstore["scale"], kstore["zero"], vstore["codes"], vstore["scale"], vstore["zero"],
                lo, hi, bits=self.bits, group=self.group, impl="native",
            )  # fmt: skip

        return read

    def dequant(self, layer, store, start, size):
        hd = store["scale"].shape[-1]
        codes = unpack_codes(slice_positions(store["codes"], start, size), self.bits, hd)
        group = (start + jnp.arange(size, dtype=jnp.int32)) // self.group
        scale = jnp.take(store["scale"], group, axis=1)
        zero = jnp.take(store["zero"], group, axis=1)
        return dequantize_groups(codes, scale, zero)

    def storage(self, kvh, hd):
        return kvh * hd * (self.bits + 32 / self.group), 0.0


@pytree_dataclass
class KIVIValueCodec(TileCodec):
    """Values per token over groups of `group` channels; no fitted parameters."""

    bits: int = static_field(2)
    group: int = static_field(32)

    def init(self, batch, capacity, kvh, hd):
        return dict(
            codes=jnp.zeros((batch, capacity, kvh, hd * self.bits // 8), jnp.uint8),
            scale=jnp.zeros((batch, capacity, kvh, hd // self.group), jnp.float16),
            zero=jnp.zeros((batch, capacity, kvh, hd // self.group), jnp.float16),
        )

    def write(self, layer, store, x, start, recent):
        b, t, kvh, hd = x.shape
        codes, scale, zero = quantize_groups(x.reshape(b, t, kvh, hd // self.group, self.group), self.bits, axis=4)
        return dict(
            codes=write_positions(store["codes"], pack_codes(codes.reshape(b, t, kvh, hd), self.bits), start),
            scale=write_positions(store["scale"], scale[..., 0], start),
            zero=write_positions(store["zero"], zero[..., 0], start),
        )

    def dequant(self, layer, store, start, size):
        scale = slice_positions(store["scale"], start, size)
        b, _, kvh, n_groups = scale.shape
        hd = n_groups * self.group
        codes = unpack_codes(slice_positions(store["codes"], start, size), self.bits, hd)
        codes = codes.reshape(b, size, kvh, n_groups, self.group)
        zero = slice_positions(store["zero"], start, size)
        return dequantize_groups(codes, scale[..., None], zero[..., None]).reshape(b, size, kvh, hd)

    def storage(self, kvh, hd):
        return kvh * hd * (self.bits + 32 / self.group), 0.0


def kivi_codecs(config, bits: int, group: int, window: int):
    """The key and value codecs and the cache's window settings (checked)."""
    if bits not in BITS:
        raise ValueError(f"kivi supports bits in {BITS} (as in the paper), got bits={bits!r}")
    hd = config.head_dim
    if hd % group:
        raise ValueError(
            f"head_dim={hd} is not divisible by group={group}: KIVI's values are grouped along channels; "
            f"pass a group that divides {hd}"
        )
    if window % group:
        raise ValueError(
            f"window={window} is not a multiple of group={group}: keys leave the window a whole number of "
            f"groups at a time; pass window={group * max(1, round(window / group))}"
        )
    settings = dict(key_rule="block", key_window=max(window, group))
    settings |= dict(value_rule="sliding", value_window=window) if window else dict(value_rule="none")
    return KIVIKeyCodec(bits, group), KIVIValueCodec(bits, group), settings
