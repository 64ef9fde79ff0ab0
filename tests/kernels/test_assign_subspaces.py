"""`assign_subspaces` (PQ encoding): every backend against a float64 numpy oracle, ties to the
lowest index, "auto" equal to XLA, and the faiss backend inside jit, vmap and grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vqlib
from vqlib.kernels import assign_subspaces

IMPLS = ["xla", "reference", "faiss"]


def _oracle(x, centroids) -> tuple[np.ndarray, np.ndarray]:
    """float64 codes and the per-subspace distance matrices."""
    m, _, dsub = centroids.shape
    parts = np.asarray(x, np.float64).reshape(len(x), m, dsub)
    d2 = ((parts[:, :, None, :] - np.asarray(centroids, np.float64)[None]) ** 2).sum(-1)  # (n, m, k)
    return d2.argmin(-1), d2


def _impl(impl):
    if impl == "faiss":
        pytest.importorskip("faiss")
    return impl


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,m,k,dsub", [(0, 2, 4, 4), (1, 1, 1, 3), (300, 4, 16, 2), (1000, 8, 256, 8), (77, 3, 5, 17)])
def test_codes_are_the_float64_nearest(impl, n, m, k, dsub):
    rng = np.random.default_rng(n + m + k)
    x = rng.normal(size=(n, m * dsub)).astype(np.float32)
    c = rng.normal(size=(m, k, dsub)).astype(np.float32)
    codes = np.asarray(assign_subspaces(x, c, impl=_impl(impl)))
    assert codes.dtype == np.int32 and codes.shape == (n, m)
    if n == 0:
        return
    want, d2 = _oracle(x, c)
    got_d = np.take_along_axis(d2, codes[..., None], -1)[..., 0]
    best = d2.min(-1)
    np.testing.assert_allclose(got_d, best, rtol=1e-5, atol=1e-5)  # a float32 near-tie may pick the other
    assert (codes == want).mean() > 0.999


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_go_to_the_lowest_index(impl):
    base = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]], np.float32)
    c = np.stack([np.tile(base, (4, 1))] * 2)  # each point 4 times: rows j, j + 3, j + 6, j + 9
    x = np.concatenate([base, base], axis=1)
    np.testing.assert_array_equal(np.asarray(assign_subspaces(x, c, impl=_impl(impl))), [[0, 0], [1, 1], [2, 2]])


def test_auto_equals_xla_and_pq_encodes_through_it():
    """ "auto" hands large encodings to faiss on CPU (from 2**22 distances per subspace) and small
    ones to XLA; both give XLA's codes, and `vqlib.encode` of a PQ codebook goes through it."""
    from vqlib.kernels._assign.subspaces import prefer_faiss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16384, 16)).astype(np.float32)
    c = rng.normal(size=(2, 256, 8)).astype(np.float32)
    assert prefer_faiss(x, c) and not prefer_faiss(x[:100], c)
    np.testing.assert_array_equal(np.asarray(assign_subspaces(x, c)), np.asarray(assign_subspaces(x, c, impl="xla")))
    cb = vqlib.codebooks.ProductCodebook(jnp.asarray(c))
    np.testing.assert_array_equal(np.asarray(vqlib.encode(cb, x)), np.asarray(assign_subspaces(x, c, impl="xla")))


def test_faiss_backend_inside_jit_vmap_and_grad():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 50, 8)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(3, 2, 16, 4)), jnp.float32)
    batched = jax.jit(jax.vmap(lambda a, b: assign_subspaces(a, b, impl="faiss")))(x, c)
    for i in range(3):
        np.testing.assert_array_equal(batched[i], assign_subspaces(x[i], c[i], impl="xla"))

    def loss(a):  # codes pick centroids; the gradient flows through the float path only
        codes = assign_subspaces(a, c[0], impl="faiss")
        picked = jnp.take_along_axis(c[0], codes.T[:, :, None], axis=1)  # (m, n, dsub)
        return jnp.sum((a.reshape(50, 2, 4).transpose(1, 0, 2) - picked) ** 2)

    g = jax.grad(loss)(x[0])
    assert g.shape == x[0].shape and bool(jnp.all(jnp.isfinite(g)))


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="centroids"):
        assign_subspaces(np.zeros((4, 6), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError):
        assign_subspaces(np.zeros((4, 6), np.float32), np.zeros((2, 4, 2), np.float32))  # 2 * 2 != 6


def test_pq_fit_chooses_faiss_on_cpu_and_trains_as_well():
    """Large PQ (and OPQ) fits assign with faiss on CPU; Lloyd from the same seeds reaches the
    same error (near-ties may send the two trajectories apart: the centroids themselves can differ)."""
    pytest.importorskip("faiss")
    assert vqlib.kernels.fitting_impl(8, 65536, 256) == ("faiss" if jax.default_backend() == "cpu" else "auto")
    assert vqlib.kernels.fitting_impl(64, 65536, 256) == "auto"
    assert vqlib.kernels.fitting_impl(8, 4096, 16) == "auto"  # small: XLA's cached program
    x = np.random.default_rng(2).normal(size=(1500, 16)).astype(np.float32)

    def mse(cb):
        return float(np.mean(np.sum((np.asarray(vqlib.decode(cb, vqlib.encode(cb, x))) - x) ** 2, axis=1)))

    faiss_fit = mse(vqlib.fit(x, "pq", m=4, k=16, max_iter=10, impl="faiss"))
    assert faiss_fit == pytest.approx(mse(vqlib.fit(x, "pq", m=4, k=16, max_iter=10, impl="xla")), rel=0.01)
