"""`kivi_attend` as the C++ FFI handler of kivi_attend.cc (built by `vqlib.kernels._native`)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from vqlib.kernels import _native

SOURCE = str(pathlib.Path(__file__).with_name("kivi_attend.cc"))
SYMBOL, TARGET = "KiviAttend", "vqlib_kivi_attend"
HEAD_DIMS, GROUPS = (64, 128), (32, 64)  # the instances kivi_attend.cc compiles (`pick`)


def why_not() -> str:
    """ "" when the handler runs here (a CPU backend and a successful build, built on first call),
    else the reason it does not."""
    if jax.default_backend() != "cpu":
        return f"it is a CPU kernel and the default backend is {jax.default_backend()!r}"
    return _native.native_error(SOURCE, SYMBOL, TARGET)


def available() -> bool:
    return not why_not()


def kivi_attend(
    q, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, lo, hi, *, bits: int, group: int
):
    _native.require_native(SOURCE, SYMBOL, TARGET)
    b, kvh, r, hd = q.shape
    if hd not in HEAD_DIMS or group not in GROUPS:
        raise NotImplementedError(
            f"the native kivi_attend is compiled for head_dim in {HEAD_DIMS} and group in {GROUPS}, got "
            f"head_dim={hd} and group={group}; use impl='reference' (or impl='auto')"
        )
    stats = jax.ShapeDtypeStruct((b, kvh, r), jnp.float32)
    call = jax.ffi.ffi_call(
        TARGET, (stats, stats, jax.ShapeDtypeStruct((b, kvh, r, hd), jnp.float32)), vmap_method="sequential"
    )
    bounds = jnp.stack([jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)])
    f16 = lambda a: jnp.asarray(a, jnp.float16)  # noqa: E731
    return call(
        jnp.asarray(q, jnp.float32),
        jnp.asarray(key_codes, jnp.uint8),
        f16(key_scale),
        f16(key_zero),
        jnp.asarray(value_codes, jnp.uint8),
        f16(value_scale),
        f16(value_zero),
        bounds,
        bits=np.int64(bits),
        group=np.int64(group),
    )
