"""Randomized Hadamard and dense Haar rotations against float64 numpy matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vqlib
from vqlib.codebooks import Rotation, fwht, random_orthogonal, random_rotation, rotate, unrotate


def sylvester(p: int) -> np.ndarray:
    """The orthonormal p x p Walsh-Hadamard matrix in Sylvester order, float64."""
    h = np.ones((1, 1))
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(p)


def dense_matrix(rot: Rotation) -> np.ndarray:
    """(factor kron H_P) diag(signs) as an explicit float64 d x d matrix."""
    factor = np.asarray(rot.factor, np.float64)
    signs = np.asarray(rot.signs, np.float64)
    return np.kron(factor, sylvester(len(signs) // len(factor))) * signs[None, :]


@pytest.mark.parametrize("d", [1, 2, 8, 256, 512, 8192])  # one, two and three Kronecker factors
def test_fwht_is_the_sylvester_matrix_and_its_own_inverse(d, key):
    x = jax.random.normal(key, (5, d))
    np.testing.assert_allclose(fwht(x), np.asarray(x, np.float64) @ sylvester(d).T, atol=1e-5)
    np.testing.assert_allclose(fwht(fwht(x)), x, atol=1e-5)


@pytest.mark.parametrize("kind", ["hadamard", "dense"])
@pytest.mark.parametrize("d", [64, 96, 50, 7])  # 2^6, 3 * 2^5, 25 * 2, odd
def test_rotate_matches_the_explicit_matrix(d, kind, key):
    rot = random_rotation(key, d, kind=kind)
    expected_factor = d if kind == "dense" else d // (d & -d)
    assert rot.factor.shape == (expected_factor, expected_factor)
    m = dense_matrix(rot)
    np.testing.assert_allclose(m @ m.T, np.eye(d), atol=1e-5)  # orthogonal
    x = jax.random.normal(jax.random.fold_in(key, 1), (3, 4, d))  # any leading batch axes
    y = rotate(rot, x)
    np.testing.assert_allclose(y, np.asarray(x, np.float64) @ m.T, atol=2e-5)
    np.testing.assert_allclose(unrotate(rot, y), x, atol=2e-5)


@pytest.mark.parametrize("kind,d", [("hadamard", 1536), ("dense", 256)])  # 1536 = 3 * 512, an embedding size
def test_norms_and_inner_products_are_preserved(kind, d, key):
    rot = random_rotation(key, d, kind=kind)
    x = np.asarray(jax.random.normal(jax.random.fold_in(key, 1), (16, d)), np.float64)
    y = np.asarray(rotate(rot, jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(y @ y.T, x @ x.T, rtol=1e-5, atol=1e-5 * d)  # float32 rounding on ~d-sized sums
    np.testing.assert_allclose(np.asarray(unrotate(rot, jnp.asarray(y, jnp.float32))), x, atol=1e-4)


def test_random_orthogonal_is_haar_not_plain_qr(key):
    # Plain Householder QR makes R_11 < 0 for almost every Gaussian matrix, so Q_11 would be
    # negative; Haar (signs of diag(R) folded in) has E[Q_11] = 0, SD(Q_11) = 1/sqrt(d).
    d, trials = 4, 1000
    q = jax.vmap(lambda k: random_orthogonal(k, d))(jax.random.split(key, trials))
    mean = float(jnp.mean(q[:, 0, 0]))
    assert abs(mean) < 4 / np.sqrt(d * trials)  # 4 standard errors
    assert float(jnp.max(jnp.abs(jnp.einsum("tij,tkj->tik", q, q) - jnp.eye(d)[None]))) < 1e-5


def test_rotation_is_jit_and_vmap_clean(key):
    keys = jax.random.split(key, 3)
    rots = jax.vmap(lambda k: random_rotation(k, 32))(keys)  # one rotation per head
    x = jax.random.normal(key, (3, 10, 32))
    batched = jax.jit(jax.vmap(rotate))(rots, x)
    for h in range(3):
        np.testing.assert_allclose(batched[h], rotate(random_rotation(keys[h], 32), x[h]), atol=1e-6)


def test_rotation_saves_and_loads(tmp_path, key):
    rot = random_rotation(key, 24)
    vqlib.save(tmp_path / "rot.vq", rot)
    back = vqlib.load(tmp_path / "rot.vq", expect=Rotation)
    np.testing.assert_array_equal(back.signs, rot.signs)
    np.testing.assert_array_equal(back.factor, rot.factor)


def test_bad_input(key):
    with pytest.raises(ValueError, match="power-of-two length, got d=12"):
        fwht(jnp.ones(12))
    with pytest.raises(ValueError, match="rotation kind must be one of"):
        random_rotation(key, 8, kind="householder")
    with pytest.raises(ValueError, match="d must be >= 1"):
        random_rotation(key, 0)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 8\) for this rotation, got \(2, 6\)"):
        rotate(random_rotation(key, 8), jnp.ones((2, 6)))
