"""vqlib.kernels.adc_topk, every implementation, against a float64 numpy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_impls import impl_kwargs, impls_of

import vqlib
from vqlib.codebooks import adc_lookup
from vqlib.kernels import BACKENDS, adc_topk

# (q, m, kc, n, k): one row and k = 1; n not a tile multiple; odd kc; q above a query tile; k = n
SHAPES = [(1, 1, 3, 1, 1), (3, 4, 16, 300, 7), (17, 3, 33, 130, 130), (2, 2, 256, 600, 20)]


def _oracle(tables, codes, bias):
    t = np.asarray(tables, np.float64)
    c = np.asarray(codes, np.int64)
    s = sum(t[:, j, c[:, j]] for j in range(c.shape[1]))
    return s + np.asarray(bias, np.float64)[None, :]


@pytest.mark.parametrize("with_bias", [False, True], ids=["no bias", "bias"])
@pytest.mark.parametrize("q,m,kc,n,k", SHAPES)
@pytest.mark.parametrize("impl", impls_of(BACKENDS["adc_topk"]))
def test_every_impl_matches_float64_oracle(impl, q, m, kc, n, k, with_bias, key):
    kw = impl_kwargs(impl)
    kt, kc_, kb = jax.random.split(key, 3)
    tables = jax.random.normal(kt, (q, m, kc))
    codes = jax.random.randint(kc_, (n, m), 0, kc).astype(jnp.uint8 if kc <= 256 else jnp.int32)
    bias = jax.random.normal(kb, (n,)) if with_bias else None
    dists, ids = adc_topk(tables, codes, k, bias=bias, **kw)
    assert dists.shape == ids.shape == (q, k) and dists.dtype == jnp.float32 and ids.dtype == jnp.int32
    s = _oracle(tables, codes, np.zeros(n) if bias is None else bias)
    want = np.argsort(s, axis=1, kind="stable")[:, :k]
    np.testing.assert_allclose(np.asarray(dists), np.take_along_axis(s, want, 1), rtol=1e-5, atol=1e-5)
    # ids exact except near ties: each returned row's true score equals the k-th best up to rounding
    got = np.take_along_axis(s, np.asarray(ids), 1)
    np.testing.assert_allclose(got, np.take_along_axis(s, want, 1), rtol=1e-5, atol=1e-5)
    assert all(len(set(row)) == k for row in np.asarray(ids).tolist()), "a row was returned twice"


@pytest.mark.parametrize("impl", impls_of(BACKENDS["adc_topk"]))
def test_ties_go_to_the_lowest_row(impl):
    kw = impl_kwargs(impl)
    tables = jnp.asarray([[[0.0, 1.0], [0.0, 2.0]]])  # scores 0, 1, 2, 3 with many equal rows
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 2, size=(300, 2)), jnp.int32)
    dists, ids = adc_topk(tables, codes, 40, **kw)
    s = _oracle(tables, codes, np.zeros(300))[0]
    np.testing.assert_array_equal(np.asarray(ids)[0], np.argsort(s, kind="stable")[:40])


def test_bfloat16_tables_and_agreement_with_adc_lookup(key):
    kt, kc = jax.random.split(key)
    tables = jax.random.normal(kt, (4, 8, 16)).astype(jnp.bfloat16)
    codes = jax.random.randint(kc, (500, 8), 0, 16)
    scores = np.asarray(adc_lookup(tables.astype(jnp.float32), codes))
    for impl, interpret in [("xla", False), ("pallas_gpu", True), ("pallas_tpu", True)]:
        dists, ids = adc_topk(tables, codes, 10, impl=impl, interpret=interpret)
        np.testing.assert_allclose(np.asarray(dists), np.sort(scores, 1)[:, :10], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.take_along_axis(scores, np.asarray(ids), 1), np.asarray(dists), atol=1e-5)


def test_argument_errors():
    tables, codes = jnp.ones((2, 3, 4)), jnp.zeros((5, 3), jnp.int32)
    with pytest.raises(ValueError, match="k must be <= 5"):
        adc_topk(tables, codes, 6)
    with pytest.raises(ValueError, match="m=3 codebooks"):
        adc_topk(tables, codes[:, :2], 1)
    with pytest.raises(TypeError, match="integer"):
        adc_topk(tables, codes.astype(jnp.float32), 1)
    with pytest.raises(ValueError, match="bias must have shape"):
        adc_topk(tables, codes, 1, bias=jnp.ones((4,)))
    with pytest.raises(ExceptionGroup) as info:  # more results than the kernel selects on chip
        adc_topk(jnp.ones((1, 1, 3)), jnp.zeros((400, 1), jnp.int32), 257, impl="pallas_gpu", interpret=True)
    assert info.group_contains(NotImplementedError, match="at most 256")


@pytest.mark.parametrize("lookup", ["onehot", "gather"])
@pytest.mark.parametrize("q,m,kc,n,k", SHAPES)
def test_pallas_gpu_lookups_match_the_oracle(lookup, q, m, kc, n, k, key):
    """Both ways the GPU kernel reads the tables; compiled on a GPU, in the interpreter elsewhere."""
    gpu = vqlib.kernels.backend("adc_topk", "pallas_gpu")
    kt, kc_, kb = jax.random.split(key, 3)
    tables = jax.random.normal(kt, (q, m, kc))
    codes = jax.random.randint(kc_, (n, m), 0, kc).astype(jnp.uint8 if kc <= 256 else jnp.int32)
    bias = jax.random.normal(kb, (n,))
    block = gpu.BlockSizes(lookup=lookup, block_q=16, block_n=128)
    dists, ids = gpu.adc_topk(tables, codes, k, bias, block=block, interpret=jax.default_backend() != "gpu")
    s = _oracle(tables, codes, bias)
    want = np.take_along_axis(s, np.argsort(s, axis=1, kind="stable")[:, :k], 1)
    np.testing.assert_allclose(np.asarray(dists), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(s, np.asarray(ids), 1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", impls_of(BACKENDS["adc_topk"]))
def test_int32_codes_with_a_partial_last_tile(impl, key):
    """Regression (H200, IVF-PQ search): the GPU gather kernel read the table at the codes of rows
    past n, which a masked int32 load leaves arbitrary (negative), and hit an illegal address.
    IVF-PQ's shape: one query, the probed lists' tables side by side (kc = 8 x 256)."""
    kw = impl_kwargs(impl)
    kt, kc_, kb = jax.random.split(key, 3)
    tables = jax.random.normal(kt, (1, 16, 2048))
    codes = jax.random.randint(kc_, (1000, 16), 0, 2048, jnp.int32)  # 1000: not a multiple of 512
    bias = jax.random.normal(kb, (1000,))
    dists, ids = adc_topk(tables, codes, 10, bias=bias, **kw)
    s = _oracle(tables, codes, bias)
    want = np.take_along_axis(s, np.argsort(s, axis=1, kind="stable")[:, :10], 1)
    np.testing.assert_allclose(np.asarray(dists), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ids), np.argsort(s, axis=1, kind="stable")[:, :10])
