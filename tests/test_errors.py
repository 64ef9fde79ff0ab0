"""Bad input at the public boundary: the right exception type, a message naming the argument,
raised before any fitting, assignment or decoding work starts."""

import importlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

import vqlib
from vqlib.codebooks import KMeansCodebook, _kmeans

_kernel_dispatch = importlib.import_module("vqlib.kernels._dispatch")


class _WorkStarted(AssertionError):
    pass


def _no_work(*args, **kwargs):
    raise _WorkStarted("expensive work started before the input was validated")


@pytest.fixture(autouse=True)
def no_expensive_work(monkeypatch):
    """Every entry point into fitting, assignment and decoding fails the test if reached, so each
    expected error below must be raised by validation first."""
    monkeypatch.setattr(_kmeans, "_fit", _no_work)
    monkeypatch.setattr(_kmeans, "_fit_sharded", _no_work)
    monkeypatch.setattr(_kmeans, "_decode", _no_work)
    monkeypatch.setattr(_kernel_dispatch, "load", lambda path: _no_work)  # every kernel backend


def _re_shape(shape):
    """The regex for a shape tuple as Python prints it: (6,) or (2, 6, 2)."""
    return "\\(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + "\\)"


@pytest.fixture
def x():
    return np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32)


@pytest.fixture
def cb():
    return KMeansCodebook(centroids=jnp.asarray(np.arange(6, dtype=np.float32).reshape(3, 2)))


# ----------------------------------------------------------------------------- the guard itself


def test_guard_stops_valid_calls(key, x, cb):
    """The fixture really intercepts the work, so a passing error test means the error came first."""
    with pytest.raises(_WorkStarted):
        vqlib.fit(x, "kmeans", k=3)
    with pytest.raises(_WorkStarted):
        vqlib.codebooks.fit_kmeans_batched(key, x[None], k=3)
    with pytest.raises(_WorkStarted):
        vqlib.encode(cb, x)
    with pytest.raises(_WorkStarted):
        vqlib.decode(cb, np.array([0, 2], np.int32))
    with pytest.raises(_WorkStarted):
        vqlib.assign(x, x[:3])
    with pytest.raises(_WorkStarted):
        vqlib.kernels.assign(x, x[:3], impl="reference")


# ----------------------------------------------------------------------------- x


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_fit_nonfinite_x(x, bad):
    x[4, 1] = bad
    with pytest.raises(ValueError, match=r"^x contains 1 NaN or inf values \(first at index \(4, 1\)\)"):
        vqlib.fit(x, "kmeans", k=3)


@pytest.mark.parametrize("shape", [(6,), (2, 6, 2)], ids=["1d", "3d"])
def test_fit_x_not_2d(shape):
    with pytest.raises(ValueError, match=r"^x must be 2-D, got shape " + _re_shape(shape)):
        vqlib.fit(np.zeros(shape, np.float32), "kmeans", k=1)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_fit_non_float_x(x, dtype):
    with pytest.raises(TypeError, match=r"^x must have a floating dtype .*got " + np.dtype(dtype).name):
        vqlib.fit(x.astype(dtype), "kmeans", k=3)


def test_fit_complex_x(x):
    with pytest.raises(TypeError, match=r"^x must have a floating dtype .*got complex64"):
        vqlib.fit(x.astype(np.complex64), "kmeans", k=3)


def test_fit_jax_integer_x(x):
    with pytest.raises(TypeError, match=r"^x must have a floating dtype"):
        vqlib.fit(jnp.asarray(x).astype(jnp.int32), "kmeans", k=3)


# ----------------------------------------------------------------------------- k


def test_fit_k_zero(x):
    with pytest.raises(ValueError, match=r"^k must be >= 1, got 0"):
        vqlib.fit(x, "kmeans", k=0)


def test_fit_k_negative(x):
    with pytest.raises(ValueError, match=r"^k must be >= 1, got -2"):
        vqlib.fit(x, "kmeans", k=-2)


def test_fit_k_larger_than_n(x):
    with pytest.raises(ValueError, match=r"^k=7 is larger than the number of vectors n=6"):
        vqlib.fit(x, "kmeans", k=7)


@pytest.mark.parametrize("k", [2.5, 3.0, "3", True, None], ids=["2.5", "3.0", "str", "bool", "None"])
def test_fit_k_not_int(x, k):
    with pytest.raises(TypeError, match=r"^k must be an int"):
        vqlib.fit(x, "kmeans", k=k)


def test_fit_k_numpy_int_is_accepted(x):
    with pytest.raises(_WorkStarted):  # validation passes, then the (guarded) fit starts
        vqlib.fit(x, "kmeans", k=np.int64(3))


# ----------------------------------------------------------------------------- init, max_iter, tol


@pytest.mark.parametrize("shape", [(2, 2), (3, 3), (4, 2)])
def test_fit_init_wrong_shape(x, shape):
    with pytest.raises(ValueError, match=r"^init must have shape \(3, 2\)"):
        vqlib.fit(x, "kmeans", k=3, init=np.zeros(shape, np.float32))


def test_fit_init_wrong_ndim(x):
    with pytest.raises(ValueError, match=r"^init must be 2-D"):
        vqlib.fit(x, "kmeans", k=3, init=np.zeros((6,), np.float32))


def test_fit_init_integer(x):
    with pytest.raises(TypeError, match=r"^init must have a floating dtype"):
        vqlib.fit(x, "kmeans", k=3, init=np.zeros((3, 2), np.int32))


def test_fit_init_nonfinite(x):
    init = np.zeros((3, 2), np.float32)
    init[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"^init contains 1 NaN or inf"):
        vqlib.fit(x, "kmeans", k=3, init=init)


@pytest.mark.parametrize("init", ["kmeans++", "nonsense", ""])
def test_fit_init_unknown_string(x, init):
    with pytest.raises(ValueError, match=rf"^init must be one of \('k-means\+\+', 'random'\).*got '{re.escape(init)}'"):
        vqlib.fit(x, "kmeans", k=3, init=init)


def test_fit_max_iter_negative(x):
    with pytest.raises(ValueError, match=r"^max_iter must be >= 0, got -1"):
        vqlib.fit(x, "kmeans", k=3, max_iter=-1)


def test_fit_max_iter_not_int(x):
    with pytest.raises(TypeError, match=r"^max_iter must be an int"):
        vqlib.fit(x, "kmeans", k=3, max_iter=10.0)


@pytest.mark.parametrize("tol", [-1e-4, np.nan, np.inf], ids=["negative", "nan", "inf"])
def test_fit_tol_bad_value(x, tol):
    with pytest.raises(ValueError, match=r"^tol must be a finite number >= 0"):
        vqlib.fit(x, "kmeans", k=3, tol=tol)


def test_fit_update_unknown(x):
    with pytest.raises(ValueError, match=r"^update must be one of"):
        vqlib.fit(x, "kmeans", k=3, update="nonsense")


def test_fit_impl_unknown(x):
    with pytest.raises(ValueError, match=r"^impl must be one of"):
        vqlib.fit(x, "kmeans", k=3, impl="nonsense")


# ----------------------------------------------------------------------------- sample_weight


@pytest.mark.parametrize("shape", [(5,), (7,), (6, 1)])
def test_fit_sample_weight_wrong_shape(x, shape):
    with pytest.raises(ValueError, match=r"^sample_weight must"):
        vqlib.fit(x, "kmeans", k=3, sample_weight=np.ones(shape, np.float32))


def test_fit_sample_weight_negative(x):
    w = np.ones(6, np.float32)
    w[2] = -0.5
    with pytest.raises(ValueError, match=r"^sample_weight must be >= 0"):
        vqlib.fit(x, "kmeans", k=3, sample_weight=w)


def test_fit_sample_weight_all_zero(x):
    with pytest.raises(ValueError, match=r"^sample_weight sums to 0"):
        vqlib.fit(x, "kmeans", k=3, sample_weight=np.zeros(6, np.float32))


def test_fit_sample_weight_nonfinite(x):
    w = np.ones(6, np.float32)
    w[0] = np.inf
    with pytest.raises(ValueError, match=r"^sample_weight contains 1 NaN or inf"):
        vqlib.fit(x, "kmeans", k=3, sample_weight=w)


def test_fit_sample_weight_integer(x):
    with pytest.raises(TypeError, match=r"^sample_weight must have a floating dtype"):
        vqlib.fit(x, "kmeans", k=3, sample_weight=np.ones(6, np.int32))


# ----------------------------------------------------------------------------- method and options


@pytest.mark.parametrize("method", ["ivf", "KMeans", ""])
def test_fit_unknown_method(x, method):
    with pytest.raises(ValueError, match=rf"^unknown method '{method}'; choose one of \[.*'kmeans'.*\]"):
        vqlib.fit(x, method, k=3)


def test_fit_unknown_option(x):
    with pytest.raises(
        TypeError, match=r"^unknown option\(s\) \['kk'\] for method 'kmeans'; valid options are \[.*'k'"
    ):
        vqlib.fit(x, "kmeans", k=3, kk=4)


def test_fit_unknown_option_lists_every_valid_option(x):
    with pytest.raises(TypeError) as info:
        vqlib.fit(x, "kmeans", k=3, iters=4)
    for option in ("k", "init", "max_iter", "tol", "sample_weight"):
        assert f"'{option}'" in str(info.value)


def test_fit_missing_k(x):
    with pytest.raises(TypeError, match=r"^method 'kmeans' needs option\(s\) \['k'\]"):
        vqlib.fit(x, "kmeans")


# ----------------------------------------------------------------------------- encode / decode / assign


@pytest.mark.parametrize("d", [1, 3])
def test_encode_mismatched_d(cb, d):
    with pytest.raises(ValueError, match=rf"^x has dimension {d} but the codebook was fitted on d=2"):
        vqlib.encode(cb, np.zeros((4, d), np.float32))


def test_encode_integer_x(cb):
    with pytest.raises(TypeError, match=r"^x must have a floating dtype"):
        vqlib.encode(cb, np.zeros((4, 2), np.int32))


def test_encode_nonfinite_x(cb):
    v = np.zeros((4, 2), np.float32)
    v[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"^x contains 1 NaN or inf"):
        vqlib.encode(cb, v)


@pytest.mark.parametrize(
    ("codes", "seen"),
    [([0, -1, 2], r"\[-1, 2\]"), ([0, 3], r"\[0, 3\]"), ([[7]], r"\[7, 7\]")],
    ids=["neg", "k", "big"],
)
def test_decode_codes_out_of_range(cb, codes, seen):
    with pytest.raises(ValueError, match=rf"^codes must lie in \[0, 3\) for this codebook, got values in {seen}"):
        vqlib.decode(cb, np.array(codes, np.int32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_])
def test_decode_non_integer_codes(cb, dtype):
    with pytest.raises(TypeError, match=r"^codes must be an integer array, got dtype " + np.dtype(dtype).name):
        vqlib.decode(cb, np.zeros(3, dtype))


def test_decode_python_float_codes(cb):
    with pytest.raises(TypeError, match=r"^codes must be an integer array"):
        vqlib.decode(cb, [0.0, 1.0])


@pytest.mark.parametrize("fn", [vqlib.encode, vqlib.decode], ids=["encode", "decode"])
@pytest.mark.parametrize(
    "obj",
    [{"centroids": np.zeros((3, 2), np.float32)}, np.zeros((3, 2), np.float32), None],
    ids=["dict", "ndarray", "None"],
)
def test_non_codebook(fn, obj):
    with pytest.raises(TypeError, match=r"^expected a vqlib codebook \(.*KMeansCodebook, ProductCodebook.*\), got "):
        fn(obj, np.zeros((4, 2), np.int32 if fn is vqlib.decode else np.float32))


def test_assign_mismatched_d(x):
    with pytest.raises(ValueError, match=r"^x has dimension 2 .*d=3"):
        vqlib.assign(x, np.zeros((3, 3), np.float32))


def test_assign_centroids_not_2d(x):
    with pytest.raises(ValueError, match=r"^centroids must be 2-D"):
        vqlib.assign(x, np.zeros((2,), np.float32))


def test_assign_integer_centroids(x):
    with pytest.raises(TypeError, match=r"^centroids must have a floating dtype"):
        vqlib.assign(x, np.zeros((3, 2), np.int32))


def test_assign_empty_centroids(x):
    with pytest.raises(ValueError, match=r"^centroids must hold at least one row"):
        vqlib.assign(x, np.zeros((0, 2), np.float32))


# ----------------------------------------------------------------------------- lower-level entry points


def test_fit_kmeans_batched_2d_xs(key, x):
    with pytest.raises(ValueError, match=r"^xs must be 3-D, got shape \(6, 2\)"):
        vqlib.codebooks.fit_kmeans_batched(key, x, k=3)


def test_fit_kmeans_batched_init_wrong_shape(key, x):
    with pytest.raises(ValueError, match=r"^init must have shape \(2, 3, 2\)"):
        vqlib.codebooks.fit_kmeans_batched(key, np.stack([x, x]), k=3, init=np.zeros((3, 3, 2), np.float32))


def test_fit_kmeans_batched_negative_sample_weight(key, x):
    w = np.ones((2, 6), np.float32)
    w[1, 3] = -1.0
    with pytest.raises(ValueError, match=r"^sample_weight must be >= 0"):
        vqlib.codebooks.fit_kmeans_batched(key, np.stack([x, x]), k=3, sample_weight=w)


def test_fit_kmeans_direct_bad_k(key, x):
    with pytest.raises(ValueError, match=r"^k=9 is larger than the number of vectors n=6"):
        vqlib.codebooks.fit_kmeans(key, x, k=9)


@pytest.mark.parametrize("impl", ["nonsense", "pallas", "XLA"])
def test_kernels_assign_unknown_impl(x, impl):
    with pytest.raises(ValueError, match=rf"^impl must be one of \[.*'xla'.*\], got '{impl}'"):
        vqlib.kernels.assign(x, x[:3], impl=impl)
