"""Regression tests for inputs that used to give a wrong answer in silence (issue 15): values beyond
float32's range for squared distances, empty inputs, and faiss imports and exports whose metric
faiss and vqlib read differently. Each now gives the right answer or a ValueError naming the fix.
(Codes out of range from thin dots: tests/kernels/test_assign.py and tests/codebooks/test_product.py.)"""

import jax
import numpy as np
import pytest

import vqlib
from vqlib import retrieval
from vqlib.testing import clustered

OPTIONS = {"kmeans": dict(k=4), "pq": dict(m=4, k=4), "opq": dict(m=4, k=4, max_iter=1), "rvq": dict(m=2, k=4)}
OPTIONS |= {"aq": dict(m=2, k=4, max_iter=1), "e8": dict(bits=1), "e8p": {}, "turboquant": {}}
OPTIONS |= {"turboquant_prod": {}, "qjl": {}, "rabitq": {}}


@pytest.fixture(scope="module")
def x():
    return np.asarray(clustered(jax.random.key(0), 400, 16))


@pytest.mark.parametrize("scale, says", [(1e18, "overflow"), (1e-20, "underflow")])
@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_fit_refuses_magnitudes_whose_squared_distances_leave_float32(x, method, scale, says):
    """Before: |x| ~ 1e18 made squared norms inf (k-means codes equal to k, E8P NaN); |x| ~ 1e-20
    underflowed to 0 (fits degraded silently)."""
    with pytest.raises(ValueError, match=f"x has entries .* {says}.* rescale x"):
        vqlib.fit(x * scale, method, **OPTIONS[method])


def test_encode_search_and_assign_refuse_them_too(x):
    cb = vqlib.fit(x, "pq", m=4, k=4)
    with pytest.raises(ValueError, match="overflow"):
        vqlib.encode(cb, x * 1e19)
    with pytest.raises(ValueError, match="queries has entries .* underflow"):
        vqlib.adc_tables(cb, x * 1e-21)
    with pytest.raises(ValueError, match="overflow"):
        vqlib.assign(x * 1e19, x[:3])
    index = retrieval.build(x, "ivfflat", nlist=4)
    with pytest.raises(ValueError, match="queries has entries .* overflow"):
        retrieval.search(index, x[:2] * 1e19, k=3)
    with pytest.raises(ValueError, match="overflow"):
        retrieval.build(x * 1e19, "flat")
    with pytest.raises(ValueError, match="float64 .*|overflow"):
        retrieval.build(x.astype(np.float64) * 1e300, "flat")  # beyond float32: inf after the cast


def test_large_but_safe_magnitudes_still_give_exact_neighbours(x):
    """Data at 1e15 (squared distances ~1e31, far below float32's 3.4e38) is searched exactly."""
    big = x.astype(np.float64) * 1e15
    scores, ids = retrieval.search(retrieval.build(big.astype(np.float32), "flat"), big[:5].astype(np.float32), k=1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(scores[:, 0], 0.0, atol=1e25)  # relative to squared norms ~1e32


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_empty_inputs(x, method):
    """Before: ZeroDivisionError for d = 0 or n = 0 fits and for zero rows of TurboQuant."""
    with pytest.raises(ValueError, match="at least one vector"):
        vqlib.fit(x[:, :0], method, **OPTIONS[method])
    with pytest.raises(ValueError, match="at least one vector"):
        vqlib.fit(x[:0], method, **OPTIONS[method])
    cb = vqlib.fit(x, method, **OPTIONS[method])
    codes = vqlib.encode(cb, x[:0])
    assert codes.shape[0] == 0 and vqlib.decode(cb, codes).shape == (0, 16)
    assert vqlib.inner_product(cb, codes, x[:2]).shape == (2, 0)


@pytest.mark.parametrize("kind, options", [("flat", {}), ("pqfs", dict(m=4)), ("tq", dict(bits=2)), ("rabitq", {})])
def test_zero_queries_and_zero_rows(x, kind, options):
    """Before: flat / pqfs / tq / rabitq searches of zero queries failed (IVF returned (0, k));
    add() of zero rows raised numpy's 'need at least one array to concatenate'."""
    index = retrieval.build(x, kind, **options)
    scores, ids = retrieval.search(index, x[:0], k=5)
    assert scores.shape == ids.shape == (0, 5) and ids.dtype == np.int64
    assert retrieval.add(index, x[:0]).ntotal == index.ntotal


def test_faiss_import_refuses_an_inner_product_quantizer_of_non_unit_centroids(x):
    """Before: imported, then probed by L2 where faiss probes by inner product (67-87% of top-10
    lists identical on GloVe). Unit centroids rank lists alike in both, and still import."""
    faiss = pytest.importorskip("faiss")
    km = faiss.Kmeans(16, 8, niter=5, seed=1)
    km.train(x)  # plain L2 centroids, not unit
    quantizer = faiss.IndexFlatIP(16)
    quantizer.add(km.centroids)
    index = faiss.IndexIVFFlat(quantizer, 16, 8, faiss.METRIC_INNER_PRODUCT)
    assert index.is_trained
    index.add(x)
    with pytest.raises(ValueError, match="inner product .* not unit vectors"):
        retrieval.from_faiss(index)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    spherical = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, 8, faiss.METRIC_INNER_PRODUCT)
    spherical.cp.spherical = True  # unit coarse centroids
    spherical.train(unit)
    spherical.add(unit)
    spherical.nprobe = 3
    ours = retrieval.search(retrieval.from_faiss(spherical), unit[:50], k=5, nprobe=3)
    theirs = spherical.search(unit[:50], 5)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    assert np.mean(ours[1] == theirs[1]) > 0.98  # ties aside


def test_faiss_export_refuses_ivf_fast_scan_with_inner_products(x):
    """faiss's IndexIVFPQFastScan offsets each list by its coarse quantizer's L2 distance: an
    exported "ip" / "cos" index scored wrongly in faiss (recall 0.065 against vqlib's 0.254)."""
    pytest.importorskip("faiss")
    for metric in ("ip", "cos"):
        with pytest.raises(ValueError, match="fast_scan=False"):
            retrieval.to_faiss(retrieval.build(x, "ivfpqfs", nlist=4, m=4, metric=metric))
    retrieval.to_faiss(retrieval.build(x, "ivfpqfs", nlist=4, m=4))  # L2 exports


def test_messages_name_the_right_thing(x):
    with pytest.raises(ValueError, match="rms_scale must be a finite number > 0"):
        vqlib.fit(x, "e8p", rms_scale=0.0)
    with pytest.raises(ValueError, match="not a multiple of the E8 block of 8 coordinates"):
        vqlib.fit(x[:, :12], "e8")
    with pytest.raises(TypeError, match="'nbits' is not an option: pass k=16"):
        vqlib.fit(x, "pq", m=4, nbits=4)


def test_inputs_are_copied_not_aliased(x):
    """Numpy inputs reach XLA:CPU through one aligned copy that it adopts without copying again
    (`_checks.to_jax`): an index must not share memory with the caller's array, or writing to it
    afterwards would change the stored vectors in silence. The copy equals jnp.asarray's for every
    layout and float dtype."""
    data = np.array(x)
    index = retrieval.build(data, "flat")
    data[:] = 0.0
    np.testing.assert_array_equal(np.asarray(index.data)[: len(x)], x)  # rows in order, then padding
    for value in (x.astype(np.float64), x.astype(np.float16), x[:, ::2], np.asfortranarray(x), x[:0]):
        got = vqlib._checks.to_jax(value)
        want = jax.numpy.asarray(value)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    aligned = np.empty(x.size + 16, np.float32)
    start = -aligned.ctypes.data % 64 // 4
    data = aligned[start : start + x.size].reshape(x.shape)  # 64-byte aligned: XLA:CPU could adopt it
    data[:] = x
    got = vqlib._checks.to_jax(data)
    data[:] = 0.0
    np.testing.assert_array_equal(np.asarray(got), x)


def test_flags_given_as_text_are_refused(x):
    """Before: flags were read with bool(), so the text "False" (a command line's
    `--option fast_scan=False`) turned the option on."""
    with pytest.raises(TypeError, match="fast_scan must be True or False"):
        retrieval.build(x, "pq", m=4, k=16, fast_scan="False")
