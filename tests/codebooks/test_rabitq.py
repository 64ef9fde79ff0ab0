"""RaBitQ sign codes: the code against a float64 reference, unbiasedness over rotations, the error bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vqlib
from vqlib.codebooks import random_rotation, rotate
from vqlib.codebooks._rabitq import residual_dots


def test_codes_hold_the_signs_and_factors_of_the_rotated_unit_residual(key):
    x = np.asarray(jax.random.normal(key, (300, 24))) + 2.0
    cb = vqlib.fit(x, "rabitq")
    codes = np.asarray(vqlib.encode(cb, x))
    np.testing.assert_allclose(cb.center, x.mean(0), rtol=1e-5, atol=1e-6)
    r = x.astype(np.float64) - x.mean(0)
    o = r / np.linalg.norm(r, axis=1, keepdims=True)
    y = np.asarray(rotate(cb.rotation, jnp.asarray(o, jnp.float32)), np.float64)  # P o
    np.testing.assert_array_equal(codes[:, :24], (y > 0).astype(np.int32))
    a = np.abs(y).sum(1) / np.sqrt(24)
    assert 0.7 < a.mean() < 0.9  # about sqrt(2 / pi) = 0.80 for random directions
    # decode(code) = c + ||r|| o_bar / a with o_bar = P^T (2b - 1) / sqrt(d): check <o_bar, o> = a
    x_hat = np.asarray(vqlib.decode(cb, codes), np.float64)
    o_bar = (x_hat - x.mean(0)) * a[:, None] / np.linalg.norm(r, axis=1, keepdims=True)
    np.testing.assert_allclose(np.linalg.norm(o_bar, axis=1), 1.0, rtol=1e-4)
    np.testing.assert_allclose((o_bar * o).sum(1), a, rtol=1e-4)
    assert vqlib.code_layout(cb).bits_per_vector == 24 + 64


def test_inner_product_estimate_is_unbiased_over_rotations():
    d, trials = 32, 3000
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, d)).astype(np.float32)
    q = rng.normal(size=(3, d)).astype(np.float32)
    center = x.mean(0)

    def estimate(key):
        cb = vqlib.codebooks.RaBitQCodebook(random_rotation(key, d, kind="dense"), jnp.asarray(center))
        return residual_dots(cb, vqlib.encode(cb, x), q) + (q @ center)[:, None]

    est = np.asarray(jax.vmap(estimate)(jax.random.split(jax.random.key(1), trials)), np.float64)  # (T, 3, 4)
    exact = q.astype(np.float64) @ x.T.astype(np.float64)
    se = est.std(0) / np.sqrt(trials)
    assert np.all(np.abs(est.mean(0) - exact) < 4 * se)  # within 4 standard errors, every pair


def test_error_bound_holds_and_beats_the_plain_sign_sketch(key):
    d = 64
    x = np.asarray(jax.random.normal(key, (2000, d)))
    q = np.asarray(jax.random.normal(jax.random.fold_in(key, 1), (50, d)))
    cb = vqlib.fit(x, "rabitq")
    codes = vqlib.encode(cb, x)
    est = np.asarray(vqlib.inner_product(cb, codes, q), np.float64)  # the decode path
    np.testing.assert_allclose(
        est, np.asarray(residual_dots(cb, codes, q)) + (q @ np.asarray(cb.center))[:, None], rtol=1e-4, atol=1e-3
    )
    exact = q @ x.T
    r = x - np.asarray(cb.center)
    o = r / np.linalg.norm(r, axis=1, keepdims=True)
    a = np.abs(np.asarray(rotate(cb.rotation, jnp.asarray(o, jnp.float32)))).sum(1) / np.sqrt(d)
    # RaBitQ's analysis: the error of <o_bar, q> / a as an estimate of <o, q> (unit q) is about
    # normal with standard deviation sqrt((1 - a^2) / a^2) / sqrt(d - 1); the paper's bound takes
    # eps0 = 1.9 of them. Measured when written: z std 0.996-0.998, 94.4% within 1.9 (normal: 94.3%).
    sd = np.sqrt((1 - a**2) / a**2) / np.sqrt(d - 1)
    z = (est - exact) / (np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(r, axis=1)[None]) / sd[None]
    assert 0.95 < z.std() < 1.05 and abs(z.mean()) < 0.02
    assert 0.93 < np.mean(np.abs(z) <= 1.9) < 0.955
    qjl = vqlib.fit(x, "qjl", bits=1, norm_dtype="float32")
    qjl_err = np.asarray(vqlib.inner_product(qjl, vqlib.encode(qjl, x), q)) - exact
    assert np.mean((est - exact) ** 2) < 0.6 * np.mean(qjl_err**2)  # measured 0.33 when written


def test_bad_input():
    with pytest.raises(ValueError, match="d >= 2"):
        vqlib.fit(np.ones((5, 1), np.float32), "rabitq")
    cb = vqlib.fit(np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32), "rabitq")
    with pytest.raises(ValueError, match="dimension"):
        vqlib.encode(cb, np.ones((2, 9), np.float32))
