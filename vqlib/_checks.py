"""Validation at the public boundary: one message format, raised before any tracing work.

Every check names the argument, says what was expected and what arrived, and how to fix it.
Value checks (finite, in range) run only on concrete arrays; under `jit`/`vmap` the inputs are
tracers and only shapes and dtypes can be checked.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from vqlib._types import METRICS


def is_concrete(x) -> bool:
    """True when `x` holds values we can inspect on the host (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def check_float_array(x, name: str, *, ndim: int | None = None, vectors: bool = False) -> jax.Array:
    """Returns `x` as a JAX array after checking it is a finite floating array of rank `ndim`;
    `vectors`: also that squared distances between its rows fit float32 (see `check_scale`)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    check_float_dtype(x, name)
    if ndim is not None:
        check_rank(x, ndim, name, "; reshape it to (n, d) or use jax.vmap for a batch of problems" if ndim == 2 else "")
    # numpy arrays are checked before the cast (float64 1e300 would become inf in float32), and
    # small ones on the host (a compiled reduction costs more than it saves below ~1M entries);
    # the others after the copy, by one compiled reduction where they live
    on_host = isinstance(x, np.ndarray) and (x.dtype != jax.dtypes.canonicalize_dtype(x.dtype) or x.size <= 2**20)
    if on_host:
        _check_values(x, name, vectors)
    out = to_jax(x)
    if not on_host:
        _check_values(out, name, vectors)
    return out


def _check_values(x, name: str, vectors: bool) -> None:
    if vectors:
        check_scale(x, name)  # one pass: max |x| is NaN or inf where x is not finite
    else:
        check_finite(x, name)


def to_jax(x) -> jax.Array:
    """`x` as a jax.Array. A numpy array bound for the CPU is copied once, into a 64-byte aligned
    buffer that XLA:CPU adopts without copying again (measured: 4x faster than `jnp.asarray`,
    which copies twice for an unaligned array, once for an aligned one). The buffer is private,
    so the result does not alias the caller's array."""
    if isinstance(x, jax.Array) or not isinstance(x, np.ndarray) or jax.default_backend() != "cpu":
        return jnp.asarray(x)
    dtype = jax.dtypes.canonicalize_dtype(x.dtype)
    nbytes = x.size * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start : start + nbytes].view(dtype).reshape(x.shape)
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, as with jnp.asarray
        np.copyto(out, x, casting="unsafe")
    return jax.device_put(out)


_FLOAT32_MAX = float(np.finfo(np.float32).max)
SMALLEST_SCALE = 1e-17  # max |x| below this: squared entries (< 1e-34) near float32's smallest normal


@jax.jit
def _max_abs(x):
    return jnp.max(jnp.abs(x.astype(jnp.float32))) if x.size else jnp.float32(0)


def largest_scale(d: int) -> float:
    """The largest max |x| whose squared distances in d dimensions (up to 4 d max|x|^2) stay 16x
    below float32's largest number."""
    return (_FLOAT32_MAX / (64.0 * max(d, 1))) ** 0.5


def check_scale(x, name: str) -> None:
    """ValueError when a concrete x holds NaN or inf, or has a magnitude that makes float32 squared
    distances overflow to inf or underflow to 0 (the scores, then the codes and neighbours, would be
    wrong); all-zero x is fine."""
    if not is_concrete(x) or x.size == 0:
        return
    with jax.ensure_compile_time_eval():
        largest = float(np.max(np.abs(x))) if isinstance(x, np.ndarray) else float(_max_abs(x))
    if not np.isfinite(largest):  # NaN or inf in x (max propagates NaN): say where
        check_finite(x, name)
    d = x.shape[-1] if x.ndim else 1
    if largest > largest_scale(d):
        raise ValueError(
            f"{name} has entries up to {largest:.3g} in magnitude: float32 squared distances (up to 4 d max|x|^2) "
            f"would overflow; rescale {name} to a magnitude near 1 (e.g. divide it by {largest:.3g})"
        )
    if 0 < largest < SMALLEST_SCALE:
        raise ValueError(
            f"{name} has entries of at most {largest:.3g} in magnitude: float32 squared distances would underflow "
            f"to 0; rescale {name} to a magnitude near 1 (e.g. multiply it by {1 / largest:.3g})"
        )


@jax.jit
def _all_finite(x):
    return jnp.isfinite(x).all()


def check_float_dtype(x, name: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}; convert it with {name}.astype('float32')"
        )


def check_finite(x, name: str) -> None:
    """Raises ValueError when a concrete `x` holds NaN or inf. A jax.Array is checked where it
    lives (also when sharded over hosts); only a failing array is brought to the host to say where."""
    if not is_concrete(x):
        return
    if isinstance(x, np.ndarray):
        finite = np.all(np.isfinite(x))
    else:
        with jax.ensure_compile_time_eval():  # concrete even when called while tracing an outer jit
            finite = bool(_all_finite(x))
    if finite:
        return
    found = "NaN or inf values"
    if getattr(x, "is_fully_addressable", True):
        bad = np.argwhere(~np.isfinite(np.asarray(x, dtype=np.float32)))
        found = f"{len(bad)} NaN or inf values (first at index {tuple(int(i) for i in bad[0])})"
    raise ValueError(f"{name} contains {found}; every value must be finite (remove or impute them)")


def check_int(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """Returns `value` as a Python int after checking `low <= value <= high`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_num_codes(k, n: int, name: str = "k") -> int:
    k = check_int(k, name, low=1)
    if n == 0:
        raise ValueError("x has no rows; k-means needs at least k vectors")
    if k > n:
        raise ValueError(f"{name}={k} is larger than the number of vectors n={n}; use {name} <= {n} or more data")
    return k


def check_positive_float(value, name: str) -> float:
    """A finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_bool(value, name: str) -> bool:
    """True or False (numpy's included); anything else, the string "False" among them, raises."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False (true / false on the command line), got {value!r}")
    return bool(value)


def check_divisible(d: int, m: int, name: str = "d", by: str = "m") -> None:
    if d % m:
        padded = m * -(-d // m)
        raise ValueError(
            f"{name}={d} is not divisible by {by}={m}; pad the vectors with zero columns to {padded} "
            f"(jnp.pad(x, ((0, 0), (0, {padded - d})))) or choose a {by} that divides {d}"
        )


def check_rank(a, ndim: int, name: str, hint: str = "") -> None:
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}{hint}")


def check_dim(x, d: int, name: str = "x", what: str = "the codebook was fitted on") -> None:
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension (vectors of shape (..., {d})), got a scalar")
    if x.shape[-1] != d:
        raise ValueError(f"{name} has dimension {x.shape[-1]} but {what} d={d}; pass vectors of shape (..., {d})")


def check_sample_weight(sample_weight, n: int, batch_shape: tuple[int, ...] = ()) -> jax.Array:
    """Returns float32 weights of shape (*batch_shape, n), or None when `sample_weight` is None."""
    if sample_weight is None:
        return None
    w = check_float_array(sample_weight, "sample_weight", ndim=len(batch_shape) + 1)
    if w.shape != (*batch_shape, n):
        raise ValueError(f"sample_weight must have shape {(*batch_shape, n)} to match x, got {tuple(w.shape)}")
    if is_concrete(w):
        if bool(jnp.any(w < 0)):
            raise ValueError("sample_weight must be >= 0 everywhere; drop the rows instead of giving negative weight")
        if bool(jnp.any(jnp.sum(w.reshape(-1, n), axis=1) <= 0)):
            raise ValueError("sample_weight sums to 0: at least one point (per problem) needs a positive weight")
    return w.astype(jnp.float32)


def check_codes(codes, num_codes: int, name: str = "codes", *, width: int | None = None) -> jax.Array:
    """Checks integer codes in [0, num_codes), of shape (n, width) when `width` is given; returns int32."""
    if not hasattr(codes, "dtype"):
        codes = np.asarray(codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {codes.dtype}")
    if width is not None and (codes.ndim != 2 or codes.shape[1] != width):
        raise ValueError(
            f"{name} must have shape (n, {width}) for this codebook (one code per codebook), got {tuple(codes.shape)};"
            " were they encoded with another codebook?"
        )
    if is_concrete(codes) and codes.size:
        c = np.asarray(codes)
        lo, hi = int(c.min()), int(c.max())
        if lo < 0 or hi >= num_codes:
            raise ValueError(f"{name} must lie in [0, {num_codes}) for this codebook, got values in [{lo}, {hi}]")
    return jnp.asarray(codes).astype(jnp.int32)


def check_metric(metric, allowed: tuple[str, ...] = METRICS) -> str:
    """Returns `metric` after checking it is one of `allowed` (a subset of "l2", "ip", "cos")."""
    if metric not in allowed:
        raise ValueError(f"metric must be one of {allowed}, got {metric!r}")
    return metric


def check_tau(tau, name: str = "tau"):
    """A concrete tau must be a finite number > 0; a traced one (a schedule under jit) a scalar."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real | jax.Array | np.ndarray | np.generic):
        raise TypeError(f"{name} must be a positive number (the softmax temperature), got {type(tau).__name__}")
    if np.ndim(tau) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(tau)}; pass one temperature per call")
    if is_concrete(tau) and not (np.isfinite(float(tau)) and float(tau) > 0):
        raise ValueError(
            f"{name} must be a finite number > 0, got {float(tau)!r}; for hard k-means assignments "
            "use a small positive tau (e.g. 1e-6 times the variance of w) or vqlib.assign"
        )
    return tau
