"""RVQ and AQ against independent references: a float64 numpy beam search and least squares,
faiss-cpu's ResidualQuantizer and LocalSearchQuantizer, and monotonicity properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vqlib
from vqlib.codebooks._additive import _least_squares
from vqlib.testing import clustered


@pytest.fixture(scope="module")
def data():
    return np.asarray(clustered(jax.random.key(11), 5000, 32, num_clusters=100, intrinsic_dim=8))


def _mse(x, x_hat) -> float:
    return float(np.mean(np.sum((np.asarray(x, np.float64) - np.asarray(x_hat, np.float64)) ** 2, axis=1)))


def _errors(cb, x, codes=None):
    codes = vqlib.encode(cb, x) if codes is None else codes
    return np.sum((np.asarray(x, np.float64) - np.asarray(vqlib.decode(cb, codes), np.float64)) ** 2, axis=1)


def _beam_search_reference(codebooks, x, beam):
    """float64 beam search, one vector at a time; returns the best final squared error."""
    c = np.asarray(codebooks, np.float64)
    out = []
    for v in np.asarray(x, np.float64):
        partial = [(float(v @ v), v)]  # (error, residual)
        for j in range(c.shape[0]):
            cand = [(float(((r - c[j, i]) ** 2).sum()), r - c[j, i]) for _, r in partial for i in range(c.shape[1])]
            partial = sorted(cand, key=lambda t: t[0])[:beam]
        out.append(partial[0][0])
    return np.array(out)


@pytest.mark.parametrize("beam", [1, 3])
def test_beam_search_matches_float64_reference(data, beam):
    cb = vqlib.fit(data, "rvq", m=3, k=8, beam=beam)
    ours = _errors(cb, data[:200])
    expected = _beam_search_reference(cb.codebooks, data[:200], beam)
    # identical searches up to float32 rounding of near-equal candidates
    assert np.mean(np.isclose(ours, expected, rtol=1e-4, atol=1e-5)) > 0.99
    np.testing.assert_allclose(ours.mean(), expected.mean(), rtol=1e-3)


def test_exact_round_trip_on_codeword_sums(key):
    """Sums of one row per codebook, codebooks at scales 1, 1/8, 1/64: greedy encoding is exact."""
    codebooks = jax.random.normal(key, (3, 16, 10)) * jnp.array([1.0, 0.125, 0.015625])[:, None, None]
    cb = vqlib.codebooks.AdditiveCodebook(codebooks)
    codes = jax.random.randint(jax.random.key(2), (400, 3), 0, 16)
    np.testing.assert_array_equal(vqlib.encode(cb, vqlib.decode(cb, codes)), codes)


def test_mse_never_increases_with_stages_beam_sweeps_and_rounds(data):
    cb = vqlib.fit(data, "rvq", m=4, k=16, beam=1)
    by_stages = [_mse(data, vqlib.decode(cb, vqlib.encode(cb, data))) for cb in _prefixes(cb)]
    assert all(a >= b for a, b in zip(by_stages, by_stages[1:], strict=False)), by_stages
    by_beam = [_errors(cb.__class__(cb.codebooks, beam=b), data).mean() for b in (1, 2, 4, 16)]
    assert all(a >= b - 1e-6 for a, b in zip(by_beam, by_beam[1:], strict=False)), by_beam
    # ICM sweeps never raise any single vector's error
    errs = [_errors(cb.__class__(cb.codebooks, beam=2, icm_iter=s), data) for s in (0, 1, 3)]
    assert all(np.all(a >= b - 1e-4) for a, b in zip(errs, errs[1:], strict=False))
    by_rounds = [_mse(data, vqlib.decode(aq, vqlib.encode(aq, data))) for aq in _aq_by_rounds(data, (0, 4, 16))]
    assert all(a >= b for a, b in zip(by_rounds, by_rounds[1:], strict=False)), by_rounds


def _prefixes(cb):
    return [cb.__class__(cb.codebooks[: j + 1], beam=cb.beam) for j in range(cb.codebooks.shape[0])]


def _aq_by_rounds(x, rounds):
    return [vqlib.fit(x, "aq", m=3, k=16, beam=4, max_iter=r) for r in rounds]


def test_least_squares_matches_float64_normal_equations(key):
    n, m, k, d = 600, 3, 5, 4
    codes = jax.random.randint(key, (n, m), 0, k)
    x = jax.random.normal(jax.random.key(5), (n, d))
    w = jax.random.uniform(jax.random.key(6), (n,), minval=0.5, maxval=2.0)
    got = _least_squares(codes, x, w, 0.1, k=k)
    onehot = np.zeros((n, m * k))
    onehot[np.arange(n)[:, None], np.asarray(codes) + np.arange(m) * k] = 1.0
    wn = np.asarray(w, np.float64)
    gram = onehot.T @ (wn[:, None] * onehot) + 0.1 * np.eye(m * k)
    expected = np.linalg.solve(gram, onehot.T @ (wn[:, None] * np.asarray(x, np.float64)))
    np.testing.assert_allclose(got.reshape(m * k, d), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["rvq", "aq"])
def test_adc_tables_equal_distances_to_decoded(data, method):
    cb = vqlib.fit(data[:2000], method, m=3, k=16, **(dict(max_iter=1) if method == "aq" else {}))
    codes = vqlib.encode(cb, data[:300])
    q = np.asarray(data[-5:], np.float64)
    x_hat = np.asarray(vqlib.decode(cb, codes), np.float64)
    ip = vqlib.codebooks.adc_lookup(vqlib.adc_tables(cb, data[-5:], metric="ip"), codes)
    np.testing.assert_allclose(ip, q @ x_hat.T, rtol=1e-4, atol=1e-3)
    norms = jnp.sum(jnp.square(vqlib.decode(cb, codes)), axis=1)  # stored per vector, as faiss's _Nfloat
    l2 = vqlib.codebooks.adc_lookup(vqlib.adc_tables(cb, data[-5:], metric="l2"), codes, bias=norms)
    np.testing.assert_allclose(l2, ((q[:, None] - x_hat[None]) ** 2).sum(-1), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("beam,slack", [(1, 1.01), (4, 1.0)])
def test_rvq_mse_at_or_below_faiss(data, beam, slack):
    """Greedy (beam 1): level with faiss, local optima of the stage k-means differ by +-0.5%
    (measured 1.0030 vs 0.9976). Beam 4: measured 0.918 vs faiss 1.257."""
    faiss = pytest.importorskip("faiss")
    rq = faiss.ResidualQuantizer(32, 4, 6)
    rq.max_beam_size = beam
    rq.train(data)
    faiss_mse = _mse(data, rq.decode(rq.compute_codes(data)))
    cb = vqlib.fit(data, "rvq", m=4, k=64, beam=beam)
    ours = _mse(data, vqlib.decode(cb, vqlib.encode(cb, data)))
    assert ours <= slack * faiss_mse, (ours, faiss_mse)


def test_aq_mse_at_or_below_faiss_lsq(data):
    """Measured 0.79 vs faiss's LSQ 1.98 (its defaults: 25 training iterations)."""
    faiss = pytest.importorskip("faiss")
    lsq = faiss.LocalSearchQuantizer(32, 4, 6)
    lsq.train(data)
    faiss_mse = _mse(data, lsq.decode(lsq.compute_codes(data)))
    cb = vqlib.fit(data, "aq", m=4, k=64, beam=8, max_iter=10)
    ours = _mse(data, vqlib.decode(cb, vqlib.encode(cb, data)))
    assert ours <= faiss_mse, (ours, faiss_mse)


def test_real_embeddings_rvq_and_aq_at_or_below_faiss(shared_data):
    """GloVe (8,000 x 50), 4 x 64 codes. Measured: RVQ 7.66 vs faiss 8.03 (beam 4); AQ (defaults:
    beam 8, 40 rounds with annealed noise) 7.07 vs faiss LSQ 7.27; without the noise AQ is level (7.27)."""
    faiss = pytest.importorskip("faiss")
    path = shared_data / "glove-6b-50d" / "base.npy"
    if not path.exists():
        pytest.skip(f"{path} not found")
    x = np.ascontiguousarray(np.load(path, mmap_mode="r")[:8000], dtype=np.float32)
    rq = faiss.ResidualQuantizer(50, 4, 6)
    rq.max_beam_size = 4
    rq.train(x)
    lsq = faiss.LocalSearchQuantizer(50, 4, 6)
    lsq.train(x)
    rvq = vqlib.fit(x, "rvq", m=4, k=64, beam=4)
    aq = vqlib.fit(x, "aq", m=4, k=64, beam=8)
    assert _mse(x, vqlib.decode(rvq, vqlib.encode(rvq, x))) <= _mse(x, rq.decode(rq.compute_codes(x)))
    assert _mse(x, vqlib.decode(aq, vqlib.encode(aq, x))) <= _mse(x, lsq.decode(lsq.compute_codes(x)))


def test_aq_le_rvq_le_pq_at_equal_bits(data):
    """24 bits per vector each: PQ 4 x 64, RVQ 4 x 64, AQ 4 x 64 on correlated data."""
    mses = [
        _mse(data, vqlib.decode(cb, vqlib.encode(cb, data)))
        for cb in (
            vqlib.fit(data, "pq", m=4, k=64),
            vqlib.fit(data, "rvq", m=4, k=64, beam=4),
            vqlib.fit(data, "aq", m=4, k=64, beam=4, max_iter=3),
        )
    ]
    assert mses[2] <= mses[1] <= mses[0], mses


def test_weighted_fit_follows_the_weights(data):
    """Up-weighting half of the data lowers that half's error (and raises the other's)."""
    heavy = np.arange(5000) < 2500
    w = np.where(heavy, 10.0, 0.1).astype(np.float32)
    plain = _errors(vqlib.fit(data, "aq", m=2, k=16, max_iter=2), data)
    weighted = _errors(vqlib.fit(data, "aq", m=2, k=16, max_iter=2, sample_weight=w), data)
    assert weighted[heavy].mean() < plain[heavy].mean()
    assert weighted[~heavy].mean() > plain[~heavy].mean()


@pytest.mark.parametrize("size,count", [(2048, 8), (256, 1), (48, 3), (40, 4), (64, 5)])
def test_smallest_values_match_a_full_sort(size, count):
    from vqlib.codebooks._additive import _smallest

    values = np.random.default_rng(size + count).normal(size=size).astype(np.float32)
    values[::7] = values[0]  # ties
    best, index = _smallest(jnp.asarray(values), count)
    np.testing.assert_array_equal(best, np.sort(values)[:count])
    np.testing.assert_array_equal(values[np.asarray(index)], best)
    assert len(set(np.asarray(index).tolist())) == count
