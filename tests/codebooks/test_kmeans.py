"""flash k-means against independent references: float64 numpy Lloyd, faiss-cpu, scikit-learn."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vqlib
from vqlib.codebooks import _kmeans, fit_kmeans, fit_kmeans_batched
from vqlib.testing import clustered


def lloyd_float64(x, w, centroids, num_iters):
    """Plain Lloyd in float64; empty clusters keep their centroid (none occur on these data)."""
    x, c = np.asarray(x, np.float64), np.asarray(centroids, np.float64)
    for _ in range(num_iters):
        codes = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        sums = np.zeros_like(c)
        np.add.at(sums, codes, w[:, None] * x)
        counts = np.bincount(codes, weights=w, minlength=len(c))
        assert (counts > 0).all()
        c = sums / counts[:, None]
    return c, ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)


def inertia64(x, c):
    x, c = np.asarray(x, np.float64), np.asarray(c, np.float64)
    return float(((x[:, None, :] - c[None]) ** 2).sum(-1).min(1).sum())


@pytest.fixture
def data(key):
    return clustered(key, 4000, 16, num_clusters=12, intrinsic_dim=6)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("update", ["sort", "scatter"])
def test_matches_float64_lloyd(data, weighted, update):
    k, num_iters = 20, 6
    w = np.random.default_rng(1).uniform(0.5, 2.0, len(data)) if weighted else np.ones(len(data))
    init = data[:: len(data) // k][:k]
    cb = fit_kmeans(
        jax.random.key(0),
        data,
        k=k,
        init=init,
        max_iter=num_iters,
        tol=0.0,
        sample_weight=jnp.asarray(w, jnp.float32) if weighted else None,  # None: the unit-weight fast path
        update=update,
    )
    want_c, want_codes = lloyd_float64(data, w, init, num_iters)
    assert int(cb.stats.num_iters) == num_iters
    np.testing.assert_allclose(cb.centroids, want_c, rtol=1e-5, atol=1e-5 * np.abs(want_c).max())
    np.testing.assert_array_equal(vqlib.encode(cb, data), want_codes)


def test_inertia_history_is_exact_and_non_increasing(data):
    cb = vqlib.fit(data, "kmeans", k=30, max_iter=15, tol=0.0)
    history = np.asarray(cb.stats.inertia)
    t = int(cb.stats.num_iters)
    assert np.isnan(history[t + 1 :]).all() and not np.isnan(history[: t + 1]).any()
    assert (np.diff(history[: t + 1]) <= 1e-6 * history[0]).all()  # Lloyd never increases inertia
    np.testing.assert_allclose(history[t], inertia64(data, cb.centroids), rtol=1e-5)


def test_tol_stops_early_and_max_iter_zero_returns_the_seeds(data):
    loose = vqlib.fit(data, "kmeans", k=12, max_iter=200, tol=1e-2)
    assert 0 < int(loose.stats.num_iters) < 200
    h = np.asarray(loose.stats.inertia)
    t = int(loose.stats.num_iters)
    assert h[t - 1] - h[t] < 1e-2 * h[t - 1]
    seeds = vqlib.fit(data, "kmeans", k=12, max_iter=0)
    assert int(seeds.stats.num_iters) == 0
    np.testing.assert_allclose(seeds.stats.inertia[0], inertia64(data, seeds.centroids), rtol=1e-5)


def test_inertia_matches_faiss_and_sklearn_from_the_same_init(data):
    faiss = pytest.importorskip("faiss")
    from sklearn.cluster import KMeans

    k, num_iters = 40, 20
    x = np.asarray(data)
    init = np.asarray(vqlib.fit(data, "kmeans", k=k, max_iter=0).centroids)
    ours = vqlib.fit(data, "kmeans", k=k, init=init, max_iter=num_iters, tol=0.0)
    fk = faiss.Kmeans(x.shape[1], k, niter=num_iters, max_points_per_centroid=10**9, seed=1)
    fk.train(x, init_centroids=init)
    sk = KMeans(k, init=init, n_init=1, max_iter=num_iters, tol=0.0, algorithm="lloyd").fit(x)
    ours_i = inertia64(x, ours.centroids)
    for peer in (inertia64(x, fk.centroids), inertia64(x, sk.cluster_centers_)):
        assert abs(ours_i - peer) <= 5e-3 * peer  # measured: equal to ~1e-7 when written


def test_spherical_kmeans_matches_faiss_spherical_from_the_same_init(data):
    """metric="cos": unit centroids renormalised after every update, nearest by inner product; the
    same iterates as faiss.Kmeans(spherical=True) from the same initial centroids."""
    faiss = pytest.importorskip("faiss")
    k, num_iters = 30, 15
    x = np.asarray(data)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    init = np.asarray(vqlib.fit(x, "kmeans", k=k, max_iter=0).centroids)
    ours = vqlib.fit(x, "kmeans", k=k, init=init, max_iter=num_iters, tol=0.0, metric="cos")
    fk = faiss.Kmeans(x.shape[1], k, niter=num_iters, max_points_per_centroid=10**9, seed=1, spherical=True)
    fk.train(x, init_centroids=init / np.linalg.norm(init, axis=1, keepdims=True))
    c = np.asarray(ours.centroids, np.float64)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    # the objective of spherical k-means: the sum of each point's best cosine, compared in float64
    ours_obj = (x @ c.T).max(1).sum()
    faiss_obj = (x @ np.asarray(fk.centroids, np.float64).T).max(1).sum()
    assert abs(ours_obj - faiss_obj) <= 1e-4 * faiss_obj  # measured: equal to ~1e-7 when written
    np.testing.assert_allclose(c, fk.centroids, atol=1e-3)  # the same centroids, not only the same score
    assert (x @ c.T).max(1).sum() > (x @ np.asarray(init, np.float64).T / np.linalg.norm(init, axis=1)).max(1).sum()


def test_stops_when_every_point_sits_on_a_centroid():
    x = jnp.repeat(jnp.eye(5, dtype=jnp.float32), 7, axis=0)  # 5 distinct points, 7 copies each
    cb = vqlib.fit(x, "kmeans", k=5, max_iter=100)
    assert float(cb.stats.inertia[int(cb.stats.num_iters)]) == 0.0
    assert int(cb.stats.num_iters) <= 2


def test_kmeans_plus_plus_seeds_are_as_good_as_sklearns(data):
    from sklearn.cluster import kmeans_plusplus

    k, x = 24, np.asarray(data)
    ours = [float(vqlib.fit(x, "kmeans", k=k, max_iter=0, key=jax.random.key(s)).stats.inertia[0]) for s in range(8)]
    theirs = [inertia64(x, kmeans_plusplus(x, k, random_state=s)[0]) for s in range(8)]
    rand = [
        float(vqlib.fit(x, "kmeans", k=k, init="random", max_iter=0, key=jax.random.key(s)).stats.inertia[0])
        for s in range(8)
    ]
    # same greedy algorithm: means agree within sampling noise, and both beat random seeds
    assert np.mean(ours) < 1.15 * np.mean(theirs)
    assert np.mean(ours) < np.mean(rand)


def test_subsampled_init_gives_distinct_seeds(data):
    cb = vqlib.fit(data, "kmeans", k=16, init_sample_size=500, max_iter=0)
    assert len(np.unique(np.asarray(cb.centroids), axis=0)) == 16


def test_empty_clusters_are_reseeded_to_far_points(data):
    # five seeds far away from the data: no point picks them in the first assignment
    init = jnp.concatenate([data[:10], jnp.full((5, data.shape[1]), 1e3, jnp.float32)])
    one = vqlib.fit(data, "kmeans", k=15, init=init, max_iter=1, tol=0.0)
    assert int(one.stats.num_reseeded) == 5
    x, c = np.asarray(data, np.float64), np.asarray(init, np.float64)
    d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1).min(1)
    farthest = x[np.argsort(-d2)[:5]]  # the j-th empty cluster takes the j-th farthest point
    np.testing.assert_allclose(one.centroids[10:], farthest, rtol=1e-6)
    cb = vqlib.fit(data, "kmeans", k=15, init=init, max_iter=10, tol=0.0)
    assert (np.bincount(np.asarray(vqlib.encode(cb, data)), minlength=15) > 0).all()
    # with one far point tracked per pass, one cluster is repaired per update
    slow = vqlib.fit(data, "kmeans", k=15, init=init, max_iter=1, tol=0.0, num_far=1)
    assert int(slow.stats.num_reseeded) == 1
    np.testing.assert_array_equal(slow.centroids[11:], init[11:])


def test_sample_weight_equals_duplicating_points(data):
    x = data[:600]
    w = jnp.asarray(np.random.default_rng(0).integers(1, 4, 600), jnp.float32)
    init = x[:8]
    weighted = vqlib.fit(x, "kmeans", k=8, init=init, max_iter=5, tol=0.0, sample_weight=w)
    repeated = vqlib.fit(jnp.repeat(x, w.astype(jnp.int32), axis=0), "kmeans", k=8, init=init, max_iter=5, tol=0.0)
    np.testing.assert_allclose(weighted.centroids, repeated.centroids, rtol=1e-5, atol=1e-5)


def test_same_key_same_result_other_key_other_result(data):
    a = vqlib.fit(data, "kmeans", k=10, max_iter=3)
    b = vqlib.fit(data, "kmeans", k=10, max_iter=3)
    c = vqlib.fit(data, "kmeans", k=10, max_iter=3, key=jax.random.key(7))
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert not np.array_equal(a.centroids, c.centroids)


@settings(max_examples=5, deadline=None)
@given(n=st.integers(8, 300), d=st.integers(1, 6), k=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_jit_equals_no_jit_and_second_call_does_not_recompile(n, d, k, seed):
    x = clustered(jax.random.key(seed), n, d, num_clusters=4)
    fit = functools.partial(fit_kmeans, k=k, max_iter=4)
    eager = fit(jax.random.key(3), x)
    jitted = jax.jit(fit)(jax.random.key(3), x)
    np.testing.assert_allclose(eager.centroids, jitted.centroids, rtol=1e-5, atol=1e-5)
    before = _kmeans._fit._cache_size()
    fit(jax.random.key(4), x + 1.0)
    assert _kmeans._fit._cache_size() == before


def test_compiled_fit_equals_op_by_op_execution():
    x = clustered(jax.random.key(5), 120, 3, num_clusters=3)
    compiled = fit_kmeans(jax.random.key(1), x, k=4, max_iter=3)
    with jax.disable_jit():
        eager = fit_kmeans(jax.random.key(1), x, k=4, max_iter=3)
    np.testing.assert_allclose(eager.centroids, compiled.centroids, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eager.stats.inertia, compiled.stats.inertia, rtol=1e-5)


@settings(max_examples=5, deadline=None)
@given(
    b=st.integers(1, 5), n=st.integers(16, 200), d=st.integers(1, 6), k=st.integers(1, 8), seed=st.integers(0, 2**16)
)
def test_batched_equals_loop_of_single_fits(b, n, d, k, seed):
    xs = jax.vmap(lambda kk: clustered(kk, n, d, num_clusters=4))(jax.random.split(jax.random.key(seed), b))
    batched = fit_kmeans_batched(jax.random.key(0), xs, k=k, max_iter=10)
    keys = jax.random.split(jax.random.key(0), b)
    for i in range(b):
        single = fit_kmeans(keys[i], xs[i], k=k, max_iter=10)
        np.testing.assert_allclose(batched.centroids[i], single.centroids, rtol=1e-5, atol=1e-5)
        assert int(batched.stats.num_iters[i]) == int(single.stats.num_iters)


def test_bfloat16_input_fits_as_well_as_float32(data):
    init = data[:20]
    f32 = vqlib.fit(data, "kmeans", k=20, init=init, max_iter=10, tol=0.0)
    bf16 = vqlib.fit(data.astype(jnp.bfloat16), "kmeans", k=20, init=init, max_iter=10, tol=0.0)
    assert bf16.centroids.dtype == jnp.float32
    assert inertia64(data, bf16.centroids) <= 1.01 * inertia64(data, f32.centroids)


@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, 12), d=st.integers(1, 9), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_encode_decode_round_trip_on_codebook_rows(k, d, n, seed):
    rng = np.random.default_rng(seed)
    centroids = rng.permutation(np.arange(k * d, dtype=np.float32)).reshape(k, d)  # distinct rows
    cb = vqlib.codebooks.KMeansCodebook(centroids=jnp.asarray(centroids))
    codes = rng.integers(0, k, n)
    x = vqlib.decode(cb, codes)
    np.testing.assert_array_equal(vqlib.encode(cb, x), codes)
    np.testing.assert_array_equal(x, centroids[codes])


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_fit_is_invariant_to_point_order(seed):
    x = np.asarray(clustered(jax.random.key(seed), 300, 5, num_clusters=4))
    init = x[:6]
    perm = np.random.default_rng(seed).permutation(len(x))
    a = vqlib.fit(x, "kmeans", k=6, init=init, max_iter=8, tol=0.0)
    b = vqlib.fit(x[perm], "kmeans", k=6, init=init, max_iter=8, tol=0.0)
    np.testing.assert_allclose(a.centroids, b.centroids, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 127, 128, 20_000, 65_537])
def test_blocked_cumsum_equals_float64_cumsum(n):
    """k-means++'s D^2 sampling reads a cumulative sum (blocked as matrix products for speed):
    within float32 rounding of the float64 running total, and non-decreasing, as searchsorted needs."""
    v = np.random.default_rng(n).random(n).astype(np.float32)
    got = np.asarray(vqlib.codebooks._kmeans._blocked_cumsum(jnp.asarray(v)))
    want = np.cumsum(v.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * want[-1])
    assert np.all(np.diff(got) >= 0)
