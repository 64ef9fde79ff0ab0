"""The codebook protocol: a codebook type defined here, registered with the public function, works
in vqlib.fit, in composition, in vqlib.save / load, in an index and in lut_matmul (with no edit
anywhere in vqlib), and every landed type honours the protocol's contracts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vqlib
from vqlib import retrieval
from vqlib.codebooks import CodeLayout, pytree_dataclass, static_field
from vqlib.testing import clustered


@pytree_dataclass
class UniformCodebook:
    """A uniform scalar quantizer per coordinate: x_j ~ low_j + step_j * code_j, code_j in [0, 2**bits)."""

    low: jax.Array  # (d,)
    step: jax.Array  # (d,)
    bits: int = static_field(4)


def fit_uniform(key, x, *, bits: int = 4):
    x = jnp.asarray(x, jnp.float32)
    low, high = jnp.min(x, axis=0), jnp.max(x, axis=0)
    return UniformCodebook(low, jnp.maximum(high - low, 1e-6) / (2**bits - 1), bits)  # (d,) each


def _levels(cb):
    return cb.low[:, None] + cb.step[:, None] * jnp.arange(2**cb.bits, dtype=jnp.float32)[None, :]  # (d, k)


def _encode(cb, x):
    return jnp.clip(jnp.round((x - cb.low[None]) / cb.step[None]), 0, 2**cb.bits - 1).astype(jnp.int32)


def _decode(cb, codes):
    return cb.low[None] + cb.step[None] * codes.astype(jnp.float32)


def _validate(cb):
    if cb.low.shape != cb.step.shape or not bool(jnp.all(cb.step > 0)):
        raise ValueError("step must be > 0, one per coordinate")


vqlib.register(
    UniformCodebook,
    methods={"uniform_test": fit_uniform},
    encode=_encode,
    decode=_decode,
    layout=lambda cb: CodeLayout(cb.low.shape[0], 2**cb.bits),
    dim=lambda cb: cb.low.shape[0],
    ip_tables=lambda cb, q: q[:, :, None] * _levels(cb)[None],
    l2_tables=lambda cb, q: (q[:, :, None] - _levels(cb)[None]) ** 2,
    lut_weight=lambda cb, codes, shape: vqlib.kernels.lut_weight(
        "vq", codes.reshape(1, *shape), _levels(cb)[:, :, None]
    ),
    validate=_validate,
)


@pytest.fixture(scope="module")
def data():
    return np.asarray(clustered(jax.random.key(3), 3000, 16, num_clusters=30, intrinsic_dim=6))


def test_fit_encode_decode_through_the_front_door(data):
    cb = vqlib.fit(data, "uniform_test", bits=4)
    codes = vqlib.encode(cb, data)
    assert codes.shape == data.shape and int(codes.max()) < 16
    # rounding to the nearest level: every error within half a step (float64 check)
    err = np.abs(np.asarray(vqlib.decode(cb, codes), np.float64) - data)
    assert np.all(err <= np.asarray(cb.step, np.float64) / 2 + 1e-5)
    assert vqlib.code_layout(cb).bits_per_vector == 16 * 4
    assert vqlib.encode(cb, data.reshape(3, 1000, 16)).shape == (3, 1000, 16)  # leading axes


def test_composes_with_landed_codebooks(data):
    chain = vqlib.residual(vqlib.quantizer("uniform_test", bits=2), vqlib.quantizer("pq", m=4, k=16))
    cb = chain.fit(jax.random.key(0), data)
    first = vqlib.fit(data, "uniform_test", bits=2)

    def mse(cb):
        return vqlib.testing.mse(data, vqlib.decode(cb, vqlib.encode(cb, data)))

    assert vqlib.encode(cb, data).shape == (len(data), 16 + 4)
    assert mse(cb) < 0.5 * mse(first)  # measured: 0.06 of the first stage's error


def test_save_load_and_tables(data, tmp_path):
    cb = vqlib.fit(data, "uniform_test", bits=3)
    vqlib.save(tmp_path / "u.vq", cb)
    back = vqlib.load(tmp_path / "u.vq")
    assert type(back) is UniformCodebook and back.bits == 3
    np.testing.assert_array_equal(back.low, cb.low)
    codes = vqlib.encode(cb, data[:50])
    ref = ((data[:5, None, :].astype(np.float64) - np.asarray(vqlib.decode(cb, codes), np.float64)[None]) ** 2).sum(-1)
    got = vqlib.codebooks.adc_lookup(vqlib.adc_tables(cb, data[:5]), codes)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    bad = UniformCodebook(cb.low, -cb.step, 3)
    vqlib.save(tmp_path / "bad.vq", bad)
    with pytest.raises(ValueError, match="bad.vq.*step must be > 0"):
        vqlib.load(tmp_path / "bad.vq")


@pytest.mark.parametrize("nlist, metric", [(1, "l2"), (8, "l2"), (8, "ip")])
def test_an_index_of_the_new_type_searches_exactly_and_round_trips(data, tmp_path, nlist, metric):
    x, q = data[100:], data[:100] + 0.01
    index = retrieval.build(x, "uniform_test", nlist=nlist, metric=metric, bits=4)
    # the reference: float64 brute force over each row's reconstruction c_list + decode(code)
    lists = np.asarray(vqlib.retrieval._lists.row_lists(index.offsets, index.data.shape[0]))
    stored = index.ids >= 0
    codes = np.asarray(vqlib.codebooks.unpack_codes(index.data, 4, 16))[stored]
    recon = np.asarray(index.centroids, np.float64)[lists[stored]] + np.asarray(
        vqlib.decode(index.codebook, codes), np.float64
    )
    recon_ids = index.ids[stored]
    if metric == "l2":
        ref = ((q[:, None, :].astype(np.float64) - recon[None]) ** 2).sum(-1)
        order = np.argsort(ref, axis=1, kind="stable")[:, :10]
    else:
        ref = q.astype(np.float64) @ recon.T
        order = np.argsort(-ref, axis=1, kind="stable")[:, :10]
    scores, ids = retrieval.search(index, q, k=10, nprobe=nlist)
    np.testing.assert_allclose(scores, np.take_along_axis(ref, order, 1), rtol=1e-4, atol=1e-3)
    assert np.mean(ids == recon_ids[order]) > 0.95  # ties aside
    vqlib.save(tmp_path / "index.vq", index)
    back = vqlib.load(tmp_path / "index.vq")
    np.testing.assert_array_equal(retrieval.search(back, q, k=10, nprobe=nlist)[1], ids)


def test_lut_matmul_on_the_new_type():
    w = jax.random.normal(jax.random.key(0), (24, 16))
    cb = vqlib.fit(w, "uniform_test", bits=4)  # one quantizer per input column
    lut = vqlib.codebooks.to_lut_weight(cb, vqlib.encode(cb, w), w.shape)
    x = jax.random.normal(jax.random.key(1), (5, 16))
    want = np.asarray(x, np.float64) @ np.asarray(vqlib.decode(cb, vqlib.encode(cb, w)), np.float64).T
    np.testing.assert_allclose(vqlib.kernels.lut_matmul(x, lut), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", vqlib.codebooks.methods())
def test_every_registered_type_keeps_the_protocol(data, method):
    """encode/decode shapes and ranges; inner_product equals <q, decode> (or estimates it without
    bias for the sketches); tables sum to decode's scores; sq_norms; the load check passes."""
    options = {
        "kmeans": dict(k=16),
        "pq": dict(m=4, k=16),
        "opq": dict(m=4, k=16, max_iter=2),
        "rvq": dict(m=2, k=16),
        "aq": dict(m=2, k=16, max_iter=1),
        "e8": dict(bits=1),
        "e8p": dict(bits=3),
        "uniform_test": dict(bits=4),
    }.get(method, {})
    x = data[:400]
    cb = vqlib.fit(x, method, **options)
    codes = vqlib.encode(cb, x)
    layout = vqlib.code_layout(cb)
    assert 0 <= int(codes.min()) and int(codes.max()) < layout.num_codes
    assert codes.shape[1:] == (() if codes.ndim == 1 else (layout.num_codebooks,))
    x_hat = np.asarray(vqlib.decode(cb, codes), np.float64)
    assert x_hat.shape == x.shape and np.all(np.isfinite(x_hat))
    q = data[400:405]
    ip = np.asarray(vqlib.inner_product(cb, codes, q), np.float64)
    if method not in ("turboquant", "turboquant_prod", "qjl", "rabitq"):  # exact: <q, decode>
        np.testing.assert_allclose(ip, q @ x_hat.T, rtol=1e-4, atol=1e-3)
    if vqlib.codebooks.has_tables(cb):
        for metric in ("ip", "l2"):
            tables = vqlib.adc_tables(cb, q, metric=metric)
            bias = vqlib.codebooks.table_bias(cb, codes, metric=metric)
            got = np.asarray(vqlib.codebooks.adc_lookup(tables, codes.reshape(len(x), -1), bias))
            want = q @ x_hat.T if metric == "ip" else ((q[:, None] - x_hat[None]) ** 2).sum(-1)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-2)
    norms = np.asarray(vqlib.codebooks.sq_norms(cb, codes), np.float64)
    assert norms.shape == (len(x),) and np.all(np.isfinite(norms))
    vqlib.codebooks.validate_codebook(cb)
