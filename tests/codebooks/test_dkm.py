"""DKM against a float64 numpy reference, finite differences, scikit-learn's Lloyd at tau -> 0,
and a peak-memory bound at 2048 x 2048."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from sklearn.cluster import KMeans

from vqlib.codebooks import dkm


def dkm_reference(w, c, tau, max_iter):
    """DKM written plainly in float64 numpy: exact squared distances, the whole (n, k) attention."""
    w, c = np.asarray(w, np.float64), np.asarray(c, np.float64)

    def attention(c):
        logits = -((w[:, None, :] - c[None, :, :]) ** 2).sum(-1) / tau
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    for _ in range(max_iter):
        a = attention(c)
        c = a.T @ w / a.sum(0)[:, None]
    return attention(c) @ c, c


def _weights(key, n, d, k):
    """Weights drawn around k well-spread modes, and k starting centroids taken from them."""
    modes_key, noise_key, pick_key = jax.random.split(key, 3)
    modes = 3.0 * jax.random.normal(modes_key, (k, d))
    w = modes[jnp.arange(n) % k] + jax.random.normal(noise_key, (n, d))
    start = jax.random.choice(pick_key, n, (k,), replace=False)
    return np.asarray(w), np.asarray(w)[np.asarray(start)]


@pytest.mark.parametrize(
    "n,d,k,block_n,max_iter",
    [(1, 1, 1, None, 0), (37, 1, 4, 8, 3), (100, 3, 7, 32, 2), (129, 1, 16, None, 5)],
)
def test_matches_float64_reference(n, d, k, block_n, max_iter, key):
    w, c0 = _weights(key, n, d, k)
    tau = max(0.5 * float(np.var(w)), 0.1)
    w_soft, c = dkm(w, c0, tau=tau, max_iter=max_iter, block_n=block_n)
    ref_soft, ref_c = dkm_reference(w, c0, tau, max_iter)
    assert w_soft.shape == (n, d) and c.shape == (k, d)
    scale = np.abs(w).max()
    np.testing.assert_allclose(c, ref_c, atol=2e-5 * scale, rtol=0)
    np.testing.assert_allclose(w_soft, ref_soft, atol=2e-5 * scale, rtol=0)


def test_gradients_match_finite_differences(key):
    # float64 so finite differences are exact enough; block_n=3 over n=7 rows: 3 tiles, 2 rows of padding
    with jax.enable_x64(True):
        w, c0 = (np.asarray(a, np.float64) for a in _weights(key, 7, 2, 3))
        w, c0 = jnp.asarray(w), jnp.asarray(c0)
        tau = 0.3 * float(jnp.var(w))

        def soft_and_centroids(w, c):
            return dkm(w, c, tau=tau, max_iter=2, block_n=3)

        check_grads(soft_and_centroids, (w, c0), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("d", [1, 2])
def test_small_tau_is_hard_kmeans(d, key):
    """At tau -> 0 the attention is the nearest-centroid one-hot: max_iter DKM updates are
    scikit-learn's Lloyd iterations from the same start, and w_soft is the hard reconstruction."""
    w, c0 = _weights(key, 600, d, 6)
    max_iter = 4
    sk = KMeans(6, init=c0.astype(np.float64), n_init=1, max_iter=max_iter, tol=0.0, algorithm="lloyd")
    sk.fit(w.astype(np.float64))
    assert np.bincount(sk.labels_, minlength=6).min() > 0  # no empty cluster (the two differ there)
    w_soft, c = dkm(w, c0, tau=1e-6 * float(np.var(w)), max_iter=max_iter)
    if sk.n_iter_ == max_iter:  # else sklearn stopped at a fixed point, which DKM keeps
        np.testing.assert_allclose(c, sk.cluster_centers_, rtol=0, atol=1e-5)
    np.testing.assert_allclose(w_soft, sk.cluster_centers_[sk.labels_], rtol=0, atol=1e-5)


def test_vmap_and_traced_tau(key):
    """A batch of weight groups under vmap equals a loop; a new tau value does not recompile."""
    pairs = [_weights(k, 50, 1, 4) for k in jax.random.split(key, 3)]
    ws, cs = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    run = jax.jit(jax.vmap(lambda w, c, tau: dkm(w, c, tau=tau)[0], in_axes=(0, 0, None)))
    batched = run(ws, cs, 0.1)
    for i in range(3):
        np.testing.assert_allclose(batched[i], dkm(ws[i], cs[i], tau=0.1)[0], rtol=1e-6, atol=1e-6)
    run(ws, cs, 0.01)
    assert run._cache_size() == 1


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak RSS (VmHWM) from /proc")
def test_peak_memory_2048_squared():
    """Value and gradient of DKM on a 2048 x 2048 weight (k = 16, 3 iterations) in a fresh process.
    Autodiff through the plain formulas keeps (max_iter + 1) (n, k) attention maps and their
    logits: measured 2.5 GB of growth here. Tiled with recomputation: about 0.17 GB (in 2 s on 2
    cores). Peak RSS is VmHWM: getrusage's ru_maxrss would include the pytest process's, inherited
    across fork and exec."""
    script = """
        import jax, jax.numpy as jnp
        from vqlib.codebooks import dkm
        from vqlib.testing import process_memory as status
        w = jax.random.normal(jax.random.key(0), (2048 * 2048, 1)).block_until_ready()
        c = jnp.linspace(-2.0, 2.0, 16)[:, None]
        before = status("VmRSS")
        loss = lambda w, c: jnp.sum(dkm(w, c, tau=0.01, max_iter=3)[0] ** 2)
        value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(w, c)
        assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grads[0])))
        print((status("VmHWM") - before) / 2**30)
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    growth_gib = float(out.stdout.strip().splitlines()[-1])
    one_attention_map_gib = 2048 * 2048 * 16 * 4 / 2**30  # 0.25
    assert growth_gib < 2 * one_attention_map_gib, growth_gib


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def w():
    return np.linspace(-1.0, 1.0, 12, dtype=np.float32)[:, None]


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_tau_must_be_positive(w, tau):
    with pytest.raises(ValueError, match=r"^tau must be a finite number > 0, got"):
        dkm(w, w[:3], tau=tau)


def test_tau_type_and_shape(w):
    with pytest.raises(TypeError, match=r"^tau must be a positive number"):
        dkm(w, w[:3], tau="0.1")
    with pytest.raises(ValueError, match=r"^tau must be a scalar, got shape \(2,\)"):
        dkm(w, w[:3], tau=np.array([0.1, 0.2]))


def test_more_centroids_than_weights(w):
    with pytest.raises(ValueError, match=r"^centroids has k=13 rows but w has n=12 rows .* use 1 <= k <= 12"):
        dkm(w, np.zeros((13, 1), np.float32), tau=0.1)


def test_shapes_dtypes_and_values(w):
    with pytest.raises(ValueError, match=r"^w must be 2-D, got shape \(12,\)"):
        dkm(w[:, 0], w[:3], tau=0.1)
    with pytest.raises(ValueError, match=r"^centroids has dimension 2 but w has d=1"):
        dkm(w, np.zeros((3, 2), np.float32), tau=0.1)
    with pytest.raises(TypeError, match=r"^w must have a floating dtype"):
        dkm(w.astype(np.int32), w[:3], tau=0.1)
    with pytest.raises(ValueError, match=r"^w contains 1 NaN or inf values"):
        dkm(np.where(np.arange(12)[:, None] == 5, np.nan, w), w[:3], tau=0.1)
    with pytest.raises(ValueError, match=r"^max_iter must be >= 0, got -1"):
        dkm(w, w[:3], tau=0.1, max_iter=-1)
    with pytest.raises(ValueError, match=r"^block_n must be >= 1, got 0"):
        dkm(w, w[:3], tau=0.1, block_n=0)
