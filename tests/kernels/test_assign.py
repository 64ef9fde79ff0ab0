"""vqlib.kernels.assign against a float64 numpy oracle and against its jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_impls import impl_kwargs, impls_of

import vqlib
from vqlib.kernels import BACKENDS, _dispatch, assign, assign_reference, backend

pallas_gpu, pallas_tpu = backend("assign", "pallas_gpu"), backend("assign", "pallas_tpu")
BlockSizes, assign_xla = backend("assign", "xla").BlockSizes, backend("assign", "xla").assign

SHAPES = [(1, 1, 8), (513, 17, 3), (1000, 1, 5), (777, 300, 33), (4096, 256, 64), (1500, 256, 2), (900, 70, 7)]
BLOCKS = [BlockSizes(), BlockSizes(block_n=128, block_k=64), BlockSizes(block_n=100, block_k=7)]
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


def _oracle(x, c):
    """float64 distances computed directly as sums of squared differences."""
    x64, c64 = np.asarray(x, np.float64), np.asarray(c, np.float64)
    d2 = ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)
    return d2


def _assert_assignments_close(codes, dists, x, c, rtol):
    d2 = _oracle(x, c)
    best = d2.min(1)
    chosen = d2[np.arange(len(codes)), np.asarray(codes)]
    scale = best + np.abs(np.asarray(x, np.float64)).sum(1) * np.abs(np.asarray(c, np.float64)).max() * 1e-3
    # the chosen centroid is optimal up to rounding (codes are exact except near ties)
    np.testing.assert_array_less(chosen - best, rtol * scale + 1e-6)
    np.testing.assert_allclose(np.asarray(dists, np.float64), chosen, rtol=rtol, atol=rtol * scale.max())
    near_tie = np.sort(d2, 1)[:, 1] - best < rtol * scale if d2.shape[1] > 1 else np.zeros(len(best), bool)
    np.testing.assert_array_equal(np.asarray(codes)[~near_tie], d2.argmin(1)[~near_tie])


@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_xla_matches_float64_oracle(n, k, d, block, key):
    kx, kc = jax.random.split(key)
    x = jax.random.normal(kx, (n, d))
    c = jax.random.normal(kc, (k, d))
    codes, dists = assign_xla(x, c, block=block)
    assert codes.dtype == jnp.int32 and dists.dtype == jnp.float32
    assert codes.shape == dists.shape == (n,)
    _assert_assignments_close(codes, dists, x, c, TOL[jnp.float32])


def test_thin_dots_never_give_a_code_out_of_range():
    """Regression: for d < 16 XLA rewrites the dot as elementwise products fused into both the
    min and the index reduction, rounded differently in each, and codes equal to k came out
    (14 of 300 random problems). Every code must be in range and a float64 nearest centroid.
    k up to 300 also covers thin problems padded to 16 columns (k >= 64)."""
    rng = np.random.default_rng(0)
    for _ in range(80):  # the bug hit 14 of 300 problems: 80 miss it with probability 0.02
        n, d, k = int(rng.integers(1, 200)), int(rng.integers(1, 20)), int(rng.integers(1, 300))
        scale = 10 ** rng.uniform(-3, 3)
        x = (rng.normal(size=(n, d)) * scale).astype(np.float32)
        c = (rng.normal(size=(k, d)) * scale).astype(np.float32)
        codes, dists = assign(x, c)
        assert 0 <= int(codes.min()) and int(codes.max()) < k, (n, d, k)
        _assert_assignments_close(codes, dists, x, c, TOL[jnp.float32])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("impl", ["xla", "reference", "auto"])
def test_every_impl_matches_oracle_per_dtype(impl, dtype, key):
    kx, kc = jax.random.split(key)
    x = jax.random.normal(kx, (700, 24)).astype(dtype)
    c = jax.random.normal(kc, (130, 24)).astype(dtype)
    codes, dists = assign(x, c, impl=impl)
    _assert_assignments_close(codes, dists, x.astype(jnp.float32), c.astype(jnp.float32), TOL[dtype])


@pytest.mark.parametrize("repeats", [9, 60], ids=["k=45", "k=300 (norms folded into the product)"])
@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_ties_go_to_the_lowest_index(block, repeats):
    # centroid rows repeat with period 5: every point has exact ties at j, j+5, j+10, ...
    rng = np.random.default_rng(0)
    base = rng.integers(-3, 4, size=(5, 4)).astype(np.float32)
    c = np.tile(base, (repeats, 1))
    x = np.concatenate([base, rng.integers(-3, 4, size=(200, 4)).astype(np.float32)])
    codes, dists = assign_xla(jnp.asarray(x), jnp.asarray(c), block=block)
    d2 = _oracle(x, base)
    first = d2.argmin(1)  # np.argmin returns the first minimum: lowest index within the period
    np.testing.assert_array_equal(np.asarray(codes), first)
    np.testing.assert_array_equal(np.asarray(dists)[:5], 0.0)


def test_distances_are_clamped_at_zero():
    x = jnp.full((64, 16), 1e3, jnp.float32) + jnp.arange(16, dtype=jnp.float32)[None, :] * 1e-3
    codes, dists = assign_xla(x, x[:3])
    assert float(dists.min()) >= 0.0


def test_xla_equals_reference_codes_on_well_separated_data(key):
    kx, kc = jax.random.split(key)
    c = 10.0 * jax.random.normal(kc, (50, 16))
    x = c[jax.random.randint(kx, (2000,), 0, 50)] + 0.01 * jax.random.normal(kx, (2000, 16))
    np.testing.assert_array_equal(assign_xla(x, c)[0], assign_reference(x, c)[0])


# n not a block multiple, k = 1, odd and small d, k spanning several centroid tiles
KERNEL_SHAPES = [(1, 1, 8), (70, 1, 5), (200, 37, 3), (129, 300, 17)]
KERNEL_BLOCKS = {
    "pallas_gpu": pallas_gpu.BlockSizes(block_n=64, block_k=32),
    "pallas_tpu": pallas_tpu.BlockSizes(block_n=128, block_k=64),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("n,k,d", KERNEL_SHAPES)
@pytest.mark.parametrize("impl", impls_of(BACKENDS["assign"]))
def test_every_impl_matches_float64_oracle(impl, n, k, d, dtype, key):
    if dtype != jnp.float32 and impl in ("reference", "xla"):
        pytest.skip("covered by test_every_impl_matches_oracle_per_dtype")
    kw = impl_kwargs(impl)
    kx, kc = jax.random.split(key)
    x = jax.random.normal(kx, (n, d)).astype(dtype)
    c = jax.random.normal(kc, (k, d)).astype(dtype)
    codes, dists = assign(x, c, **kw)
    assert codes.dtype == jnp.int32 and dists.dtype == jnp.float32 and codes.shape == dists.shape == (n,)
    _assert_assignments_close(codes, dists, x.astype(jnp.float32), c.astype(jnp.float32), TOL[dtype])


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_pallas_ties_and_small_blocks(backend):
    # exact ties at j, j+5, ...: the lowest index must win, also across centroid tiles
    rng = np.random.default_rng(0)
    base = rng.integers(-3, 4, size=(5, 4)).astype(np.float32)
    c = np.tile(base, (40, 1))
    x = np.concatenate([base, rng.integers(-3, 4, size=(150, 4)).astype(np.float32)])
    module = {"pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}[backend]
    codes, dists = module.assign(jnp.asarray(x), jnp.asarray(c), block=KERNEL_BLOCKS[backend], interpret=True)
    np.testing.assert_array_equal(np.asarray(codes), _oracle(x, base).argmin(1))
    np.testing.assert_array_equal(np.asarray(dists)[:5], 0.0)


def test_explicit_pallas_without_its_device_errors_clearly():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    with pytest.raises(ExceptionGroup) as info:
        assign(jnp.ones((4, 2)), jnp.ones((3, 2)), impl="pallas_gpu")
    assert info.group_contains(NotImplementedError, match="needs a GPU.*interpret=True")


def test_auto_is_xla_on_cpu_and_falls_back_when_the_kernel_refuses(monkeypatch, key):
    if jax.default_backend() == "cpu":
        assert _dispatch.auto_order({"xla": "", "pallas_gpu": ""}) == ("xla",)
    monkeypatch.setattr(_dispatch, "platform", lambda: "gpu")
    assert _dispatch.auto_order({"xla": "", "pallas_gpu": "", "pallas_tpu": ""}) == ("pallas_gpu", "xla")
    # d above the kernel's limit: pallas_gpu refuses at trace time, "auto" falls back to xla ...
    x = jax.random.normal(key, (5, pallas_gpu.MAX_D + 1))
    codes, _ = assign(x, x[:3], impl="auto")
    np.testing.assert_array_equal(codes[:3], [0, 1, 2])
    # ... and the explicit choice does not
    with pytest.raises(ExceptionGroup) as info:
        assign(x, x[:3], impl="pallas_gpu")
    assert info.group_contains(NotImplementedError, match="d=1025")


def test_float64_is_refused_by_the_kernels():
    with jax.enable_x64(True):
        x = jnp.ones((4, 3), jnp.float64)
        with pytest.raises(ExceptionGroup) as info:
            assign(x, x, impl="pallas_gpu", interpret=True)
    assert info.group_contains(NotImplementedError, match="float64")


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl"):
        assign(jnp.ones((2, 2)), jnp.ones((1, 2)), impl="cuda")


def test_faiss_backend_ties_jit_vmap_and_kmeans():
    """The faiss backend keeps the contract: ties to the lowest index, usable under jit and vmap
    (one faiss call per problem), and k-means on it reaches the XLA path's centroids."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    base = rng.integers(-3, 4, size=(5, 4)).astype(np.float32)
    c = np.tile(base, (9, 1))  # exact ties at j, j + 5, ...
    x = np.concatenate([base, rng.integers(-3, 4, size=(200, 4)).astype(np.float32)])
    codes, dists = jax.jit(lambda x, c: assign(x, c, impl="faiss"))(x, c)
    np.testing.assert_array_equal(np.asarray(codes), _oracle(x, base).argmin(1))
    xs = jnp.asarray(rng.normal(size=(3, 50, 6)).astype(np.float32))
    cs = xs[:, :7]
    batched = jax.vmap(lambda a, b: assign(a, b, impl="faiss"))(xs, cs)
    for i in range(3):
        np.testing.assert_array_equal(batched[0][i], assign_reference(xs[i], cs[i])[0])
    data = jnp.asarray(rng.normal(size=(2000, 16)).astype(np.float32))
    init = data[:32]
    ours = vqlib.fit(data, "kmeans", k=32, init=init, max_iter=10, tol=0.0, impl="faiss")
    xla = vqlib.fit(data, "kmeans", k=32, init=init, max_iter=10, tol=0.0, impl="xla")
    np.testing.assert_allclose(ours.centroids, xla.centroids, atol=1e-4)
