"""Backend choice and argument checks for `kivi_attend`."""

from __future__ import annotations

from jaxtyping import Array, ArrayLike, Float, Float16, Int, UInt8

from vqlib import _checks
from vqlib.kernels import _dispatch
from vqlib.kernels._kv_attend import native

BACKENDS = {
    "native": "vqlib.kernels._kv_attend.native:kivi_attend",
    "reference": "vqlib.kernels._kv_attend.reference:kivi_attend_reference",
}


def kivi_attend_native_ready(head_dim: int, group: int) -> bool:
    """Whether "auto" runs the C++ kernel here for this head_dim and group (a CPU, a built handler
    and a compiled instance of the shapes); when it does not, the KV cache reads its codes in XLA
    tiles instead (same result)."""
    return head_dim in native.HEAD_DIMS and group in native.GROUPS and native.available()


def kivi_attend(
    q: Float[ArrayLike, "b kvh r hd"],
    key_codes: UInt8[ArrayLike, "b n kvh w"],
    key_scale: Float16[ArrayLike, "b n_groups kvh hd"],
    key_zero: Float16[ArrayLike, "b n_groups kvh hd"],
    value_codes: UInt8[ArrayLike, "b n kvh w"],
    value_scale: Float16[ArrayLike, "b n kvh hd_groups"],
    value_zero: Float16[ArrayLike, "b n kvh hd_groups"],
    lo: Int[ArrayLike, ""],
    hi: Int[ArrayLike, ""],
    *,
    bits: int,
    group: int,
    impl: str = "auto",
) -> tuple[Float[Array, "b kvh r"], Float[Array, "b kvh r"], Float[Array, "b kvh r hd"]]:
    """Softmax attention statistics of queries over the KIVI codes of positions [lo, hi).

    Keys are coded per channel (a float16 scale and zero per `group` positions and channel),
    values per token (a scale and zero per `group` channels and position), each element as
    `bits`-bit codes packed little-endian (`vqlib.codebooks.pack_codes`):
        k[s, d] = code * key_scale[s // group, d] + key_zero[s // group, d]
        v[s, d] = code * value_scale[s, d // group] + value_zero[s, d // group]
    per batch row and key/value head. The keys are never all decoded at once: the native kernel
    decodes one position at a time.

    Args:
        q: (b, kvh, r, hd) query rows per key/value head (already scaled by 1 / sqrt(hd)).
        key_codes, value_codes: (b, n, kvh, hd * bits / 8) uint8.
        key_scale, key_zero: (b, n / group, kvh, hd) float16.
        value_scale, value_zero: (b, n, kvh, hd / group) float16.
        lo, hi: the positions read, [lo, hi) (clipped to [0, n); an empty range is allowed).
        bits: 2 or 4.
        group: positions per key scale and channels per value scale.
        impl: "auto" (the native kernel, else the reference), "native" or "reference".

    Returns:
        (m, den, acc): per query row the largest score q.k (float32 min for an empty range), the
        sum of exp(q.k - m) and the sum of exp(q.k - m) * v, (b, kvh, r, hd): what an online
        softmax joins with other sources.

    Example:
        >>> import jax.numpy as jnp
        >>> from vqlib.kernels import kivi_attend
        >>> codes = jnp.full((1, 32, 1, 4), 0x11, jnp.uint8)  # every code 1, hd = 8 at 4 bits
        >>> ones = jnp.ones((1, 4, 1, 8), jnp.float16)  # 32 positions in groups of 8
        >>> m, den, acc = kivi_attend(jnp.ones((1, 1, 1, 8)), codes, ones, 0 * ones, codes,
        ...                           jnp.ones((1, 32, 1, 1), jnp.float16), jnp.zeros((1, 32, 1, 1), jnp.float16),
        ...                           0, 10, bits=4, group=8)
        >>> float(m[0, 0, 0]), float(den[0, 0, 0]), float(acc[0, 0, 0, 0])  # ten keys of 1s, values 1s
        (8.0, 10.0, 10.0)
    """
    _checks.check_rank(q, 4, "q", " (b, kvh, r, hd)")
    if bits not in (2, 4):
        raise ValueError(f"bits must be 2 or 4, got {bits!r}")
    b, kvh, r, hd = q.shape
    group = _checks.check_int(group, "group", low=1)
    if hd % group:
        raise ValueError(f"group={group} must divide head_dim={hd}")
    n = key_codes.shape[1] if len(key_codes.shape) == 4 else -1
    want = {
        "key_codes": (b, n, kvh, hd * bits // 8),
        "value_codes": (b, n, kvh, hd * bits // 8),
        "key_scale": (b, n // group, kvh, hd),
        "key_zero": (b, n // group, kvh, hd),
        "value_scale": (b, n, kvh, hd // group),
        "value_zero": (b, n, kvh, hd // group),
    }
    given = dict(
        key_codes=key_codes, value_codes=value_codes, key_scale=key_scale, key_zero=key_zero,
        value_scale=value_scale, value_zero=value_zero,
    )  # fmt: skip
    for name, shape in want.items():
        if n < 0 or n % group or tuple(given[name].shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(given[name].shape)}, expected {shape} for q {tuple(q.shape)}, bits={bits} "
                f"and group={group} (n a multiple of group); pass the arrays of one KIVI store"
            )
    args = (q, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, lo, hi)
    return _dispatch.dispatch("kivi_attend", impl, BACKENDS, args, interpret=False, bits=bits, group=group)
