"""Hypothesis over the public API: random shapes (n = 1, k = n, d = 1, m = d), duplicate rows,
float16 / bfloat16 / float64 input, non-contiguous arrays and extreme scales. The property is
always the same: a correct result (codes in range, finite outputs, the float64 answer where one is
defined) or a ValueError / TypeError; never another exception, never a silent wrong answer.
Sized for CI: 8 examples per parametrisation, about 150 per run (VQLIB_FUZZ_EXAMPLES raises it)."""

import os

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vqlib
from vqlib import retrieval

EXAMPLES = int(os.environ.get("VQLIB_FUZZ_EXAMPLES", "8"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]


@st.composite
def matrices(draw, max_n=40, max_d=12):
    """(n, d) arrays of a random dtype, scale, layout, with duplicated rows sometimes."""
    n = draw(st.sampled_from([n for n in (1, 2, 7, 33, 60) if n <= max_n]))  # few shapes: few compilations
    d = draw(st.sampled_from([d for d in (1, 2, 3, 8, 12) if d <= max_d]))
    seed = draw(st.integers(0, 2**16))
    scale = 10.0 ** draw(st.sampled_from([-25, -12, -3, 0, 0, 0, 2, 6, 15, 25]))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2 * d)) * scale
    if draw(st.booleans()):  # duplicates
        x[n // 2 :] = x[: n - n // 2]
    x = x[:, ::2] if draw(st.booleans()) else np.asfortranarray(x[:, :d])  # non-contiguous either way
    with np.errstate(over="ignore"):
        return x.astype(draw(st.sampled_from(DTYPES)))


def _options(draw, method: str, n: int, d: int) -> dict:
    divisors = [m for m in range(1, d + 1) if d % m == 0]
    k = draw(st.integers(1, max(1, n)))
    if method in ("pq", "opq"):
        return dict(m=draw(st.sampled_from(divisors)), k=k) | (dict(max_iter=1) if method == "opq" else {})
    if method in ("rvq", "aq"):
        return dict(m=draw(st.integers(1, 3)), k=k) | (dict(max_iter=1) if method == "aq" else {})
    if method == "kmeans":
        return dict(k=k, max_iter=5)
    if method in ("turboquant", "turboquant_prod"):
        return dict(bits=draw(st.integers(1, 4)))
    if method == "e8":
        return dict(bits=draw(st.integers(1, 2)))
    if method == "e8p":
        return dict(bits=draw(st.integers(2, 4)))
    return {}


ALLOWED = (ValueError, TypeError)


@SETTINGS
@given(data=st.data())
@pytest.mark.parametrize("method", sorted(set(vqlib.codebooks.methods()) - {"doc_sign", "uniform_test"}))
def test_fit_encode_decode_are_right_or_refuse(method, data):
    x = data.draw(matrices())
    options = _options(data.draw, method, *x.shape)
    try:
        cb = vqlib.fit(x, method, **options)
        codes = np.asarray(vqlib.encode(cb, x))
    except ALLOWED:
        return
    layout = vqlib.code_layout(cb)
    assert codes.dtype == np.int32 and 0 <= codes.min() and codes.max() < layout.num_codes
    x_hat = np.asarray(vqlib.decode(cb, codes), np.float64)
    assert x_hat.shape == x.shape and np.all(np.isfinite(x_hat))
    x64 = np.asarray(x, np.float64)
    if method == "kmeans":  # every code is a nearest centroid, in float64
        c = np.asarray(cb.centroids, np.float64)
        d2 = ((x64[:, None] - c[None]) ** 2).sum(-1)
        chosen = d2[np.arange(len(x)), codes]
        assert np.all(chosen <= d2.min(1) + 1e-4 * (d2.min(1) + (x64**2).sum(1) + (c**2).sum(1).max()))
    if vqlib.codebooks.has_tables(cb):  # tables score codes as the decoded vectors do
        q = x64[:3].astype(np.float32)
        tables = vqlib.adc_tables(cb, q, metric="ip")
        got = np.asarray(vqlib.codebooks.adc_lookup(tables, codes.reshape(len(x), -1)), np.float64)
        want = q.astype(np.float64) @ x_hat.T
        assert np.allclose(got, want, rtol=1e-3, atol=1e-3 * (np.abs(want).max() + 1e-30))


KINDS = [("flat", {}), ("ivfflat", {}), ("pq", {}), ("ivfpq", {}), ("rvq", dict(m=2, k=4)), ("tq", {}), ("rabitq", {})]


@SETTINGS
@given(data=st.data())
@pytest.mark.parametrize("kind, options", KINDS, ids=[k for k, _ in KINDS])
def test_indexes_are_right_or_refuse(kind, options, data):
    x = data.draw(matrices(max_n=60))
    n, d = x.shape
    metric = data.draw(st.sampled_from(["l2", "ip", "cos"]))
    nlist = data.draw(st.integers(1, max(1, n // 2))) if kind.startswith("ivf") or kind == "rvq" else None
    if kind in ("pq", "ivfpq"):
        options = dict(m=data.draw(st.sampled_from([m for m in range(1, d + 1) if d % m == 0])), k=4)
    k = data.draw(st.integers(1, n))
    try:
        index = retrieval.build(x, kind, metric=metric, nlist=nlist, **options)
        deleted = np.arange(0, n, 3)[: n - k]  # keep at least k vectors
        index = retrieval.delete(index, deleted)
        scores, ids = retrieval.search(index, x[:5], k=k, nprobe=index.nlist)
    except ALLOWED:
        return
    assert ids.shape == scores.shape == (min(5, n), k)
    found = ids >= 0
    assert np.all(np.isin(ids[found], np.setdiff1d(np.arange(n), deleted)))
    assert np.all(np.isfinite(scores[found]))
    order = scores if metric == "l2" else -scores
    assert np.all(np.diff(np.where(found, order, np.inf), axis=1) >= -1e-3 * (np.abs(order[found]).max() + 1e-30))
    if kind in ("flat", "ivfflat"):  # exact: the float64 brute force's scores
        x64 = np.asarray(x, np.float64)
        keep = np.setdiff1d(np.arange(n), deleted)
        base, q = x64[keep], x64[:5]
        if metric == "cos":
            base = base / np.linalg.norm(base, axis=1, keepdims=True)
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
        ref = ((q[:, None] - base[None]) ** 2).sum(-1) if metric == "l2" else -(q @ base.T)
        best = np.sort(ref, axis=1)[:, :k]
        got = scores.astype(np.float64) if metric == "l2" else -scores.astype(np.float64)
        scale = np.abs(ref).max() + (q**2).sum(1).max() + 1e-30
        assert np.allclose(got, best, atol=1e-4 * scale, rtol=1e-3)


@SETTINGS
@given(data=st.data())
def test_save_load_round_trips_or_refuse(tmp_path_factory, data):
    x = data.draw(matrices())
    method = data.draw(st.sampled_from(["kmeans", "pq", "rvq", "turboquant", "rabitq", "e8p"]))
    try:
        cb = vqlib.fit(x, method, **_options(data.draw, method, *x.shape))
    except ALLOWED:
        return
    path = tmp_path_factory.mktemp("fuzz") / "cb.vq"
    vqlib.save(path, cb)
    back = vqlib.load(path)
    assert type(back) is type(cb)
    for a, b in zip(_leaves(cb), _leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]
