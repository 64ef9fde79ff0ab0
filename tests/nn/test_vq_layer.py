"""The VQ-VAE layer against closed forms in float64 numpy and scikit-learn's k-means: nearest codes,
straight-through and rotation-trick gradients, losses, EMA convergence, dead-code restart, SimVQ."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.cluster import KMeans, kmeans_plusplus

import vqlib
from vqlib.nn import ema_init, ema_update, restart_dead_codes, vector_quantize


def _problem(key, n=60, d=3, k=7):
    zkey, ckey = jax.random.split(key)
    return np.asarray(jax.random.normal(zkey, (n, d))), np.asarray(jax.random.normal(ckey, (k, d)))


def _nearest(z, codebook):
    d2 = ((np.asarray(z, np.float64)[:, None, :] - np.asarray(codebook, np.float64)[None]) ** 2).sum(-1)
    return d2.argmin(1)


def _blobs(key, n, d, k, spread=8.0):
    """k well-separated Gaussian blobs (unit variance), n points in a fixed shuffled order."""
    ckey, nkey, pkey = jax.random.split(key, 3)
    centers = spread * jax.random.normal(ckey, (k, d))
    x = centers[jnp.arange(n) % k] + jax.random.normal(nkey, (n, d))
    return np.asarray(jax.random.permutation(pkey, x))


def test_nearest_code_and_straight_through_gradient(key):
    z, codebook = _problem(key)
    out, codes, _ = vector_quantize(z, codebook)
    expected = _nearest(z, codebook)
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_allclose(out, codebook[expected], atol=1e-6)
    g = np.asarray(jax.random.normal(jax.random.fold_in(key, 1), z.shape))
    grad_z, grad_c = jax.grad(lambda z, c: jnp.sum(vector_quantize(z, c)[0] * g), argnums=(0, 1))(z, codebook)
    np.testing.assert_allclose(grad_z, g, atol=1e-6)  # straight through: dL/dz = dL/dout
    np.testing.assert_array_equal(grad_c, 0.0)  # only the codebook loss reaches the codebook


def test_rotation_trick_gradient_is_rotated(key):
    z, codebook = _problem(key)
    out, codes, _ = vector_quantize(z, codebook, rotation_trick=True)
    q = codebook[_nearest(z, codebook)].astype(np.float64)
    np.testing.assert_allclose(out, q, atol=1e-5)
    g = np.asarray(jax.random.normal(jax.random.fold_in(key, 1), z.shape), np.float64)
    grad = jax.grad(lambda z: jnp.sum(vector_quantize(z, codebook, rotation_trick=True)[0] * g))(z)
    for zi, qi, gi, got in zip(z.astype(np.float64), q, g, np.asarray(grad), strict=True):
        e, q_hat = zi / np.linalg.norm(zi), qi / np.linalg.norm(qi)
        r = (e + q_hat) / np.linalg.norm(e + q_hat)
        rotation = np.eye(3) - 2 * np.outer(r, r) + 2 * np.outer(q_hat, e)
        scale = np.linalg.norm(qi) / np.linalg.norm(zi)
        np.testing.assert_allclose(scale * rotation @ zi, qi, atol=1e-9)  # the reference maps z onto q
        np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-9)  # and is a rotation
        np.testing.assert_allclose(got, scale * rotation.T @ gi, rtol=1e-4, atol=1e-5)


def test_losses_usage_and_perplexity(key):
    z, codebook = _problem(key)
    beta = 0.3
    _, codes, stats = vector_quantize(z, codebook, commitment_cost=beta)
    c = _nearest(z, codebook)
    diff = z.astype(np.float64) - codebook[c]
    np.testing.assert_allclose(stats.commitment_loss, np.mean(diff**2), rtol=1e-5)
    np.testing.assert_allclose(stats.codebook_loss, np.mean(diff**2), rtol=1e-5)
    np.testing.assert_allclose(stats.loss, (1 + beta) * np.mean(diff**2), rtol=1e-5)
    usage = np.bincount(c, minlength=7) / 60
    np.testing.assert_allclose(stats.usage, usage, atol=1e-7)
    p = usage[usage > 0]
    np.testing.assert_allclose(stats.perplexity, np.exp(-(p * np.log(p)).sum()), rtol=1e-5)
    grad_z, grad_c = jax.grad(lambda z, cb: vector_quantize(z, cb, commitment_cost=beta)[2].loss, argnums=(0, 1))(
        z, codebook
    )
    np.testing.assert_allclose(grad_z, 2 * beta * diff / diff.size, rtol=1e-4, atol=1e-7)
    expected_c = np.zeros_like(codebook, dtype=np.float64)
    np.add.at(expected_c, c, -2 * diff / diff.size)
    np.testing.assert_allclose(grad_c, expected_c, rtol=1e-4, atol=1e-7)


def test_ema_codebook_converges_to_kmeans(key):
    """A fixed stream of minibatches through the EMA layer (nnx.jit train steps): the codebook
    settles on scikit-learn's k-means centroids from the same k-means++ start."""
    k, d, batch = 6, 4, 256
    x = _blobs(key, 3072, d, k)
    start, _ = kmeans_plusplus(x, k, random_state=0)
    reference = KMeans(k, init=start, n_init=1, tol=0.0).fit(x).cluster_centers_
    vq = vqlib.nn.VectorQuantizer(k, d, rngs=nnx.Rngs(0), decay=0.95)
    vq.ema.set_value(ema_init(start.astype(np.float32)))

    @nnx.jit
    def step(vq, z):
        return vq(z)[2].perplexity

    initial_error = np.abs(start - reference).max()
    for _ in range(8):
        for i in range(0, len(x), batch):
            step(vq, x[i : i + batch])
    final = np.asarray(vq.ema.get_value().codebook)
    # measured: largest coordinate error 2.4 at the start (blob std 1), 0.013 after 8 passes
    assert initial_error > 1.0
    np.testing.assert_allclose(final, reference, atol=0.05)


def test_ema_update_matches_closed_form(key):
    z, codebook = _problem(key)
    state = ema_init(codebook)
    codes = _nearest(z, codebook)
    decay = 0.9
    one = ema_update(state, z, jnp.asarray(codes, jnp.int32), decay=decay)
    counts = (1 - decay) * np.bincount(codes, minlength=7)
    sums = np.zeros((7, 3))
    np.add.at(sums, codes, (1 - decay) * z)
    np.testing.assert_allclose(one.counts, counts, rtol=1e-6)
    np.testing.assert_allclose(one.sums, sums, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(one.weight, 1 - decay, rtol=1e-6)
    used = counts > 0
    np.testing.assert_allclose(one.codebook[used], sums[used] / counts[used][:, None], rtol=1e-5)
    np.testing.assert_array_equal(one.codebook[~used], codebook[~used])  # unreached codes keep their rows


def test_dead_codes_restart_at_worst_coded_batch_vectors(key):
    x = _blobs(key, 512, 2, 3)
    live = KMeans(3, n_init=1, random_state=0).fit(x).cluster_centers_.astype(np.float32)
    far = np.full((3, 2), 1e3, np.float32) + np.arange(3, dtype=np.float32)[:, None]  # never the nearest code
    codebook = np.concatenate([live[:1], far[:1], live[1:], far[1:]])  # dead codes at 1, 4, 5
    state = ema_init(codebook)
    _, codes, _ = vector_quantize(x, codebook)
    state = ema_update(state, x, codes)
    updated = np.asarray(state.codebook)
    state, num = restart_dead_codes(state, x, threshold=1.0)
    assert int(num) == 3
    d2 = ((x[:, None, :].astype(np.float64) - updated[None]) ** 2).sum(-1).min(1)
    worst = np.argsort(-d2, kind="stable")[:3]
    np.testing.assert_array_equal(np.asarray(state.codebook)[[1, 4, 5]], x[worst])
    np.testing.assert_array_equal(np.asarray(state.codebook)[[0, 2, 3]], updated[[0, 2, 3]])
    np.testing.assert_allclose(np.asarray(state.counts)[[1, 4, 5]] / np.asarray(state.weight), 1.0, rtol=1e-5)
    _, codes, stats = vector_quantize(x, state.codebook)
    assert np.all(np.asarray(stats.usage)[[1, 4, 5]] > 0)  # the restarted codes are in use


def test_restarts_limited_to_batch_vectors_with_an_error(key):
    start = ema_init(np.asarray(jax.random.normal(key, (8, 2))))
    z = np.array([[1.0, 1.0], [1.0, 1.0], [3.0, 3.0]], np.float32)
    state = ema_update(start, z, jnp.zeros((3,), jnp.int32))  # code 0 takes every vector
    _, num = restart_dead_codes(state, z, threshold=1.0)
    assert int(num) == 3  # 7 dead codes, 3 batch vectors
    state = ema_update(start, z[:2], jnp.zeros((2,), jnp.int32))  # code 0 sits on both vectors
    _, num = restart_dead_codes(state, z[:2], threshold=1.0)
    assert int(num) == 0  # no vector is coded with an error > 0


def test_module_eval_freezes_state_and_counts_restarts(key):
    vq = vqlib.nn.VectorQuantizer(6, 2, rngs=nnx.Rngs(1), dead_code_threshold=1.0)
    z = _blobs(key, 512, 2, 3) + 100.0  # far from every initial code: few codes used
    _, _, stats = vq(z)
    assert int(stats.num_restarted) == 6 - np.count_nonzero(stats.usage) > 0
    before = jax.tree.map(np.asarray, vq.ema.get_value())
    vq.eval()
    vq(z)
    after = jax.tree.map(np.asarray, vq.ema.get_value())
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_learned_and_linear_codebook_gradients(key):
    """'learned': dL/dcodebook is the codebook-loss gradient; 'linear' (SimVQ): dL/dprojection is
    -2/(n d) sum_i basis[c_i]^T (z_i - basis[c_i] W), and the codes are nearest rows of basis @ W."""
    z = np.asarray(jax.random.normal(key, (30, 3)))
    beta = 0.25
    for kind in ("learned", "linear"):
        vq = vqlib.nn.VectorQuantizer(5, 3, rngs=nnx.Rngs(2), codebook=kind, commitment_cost=beta)
        if kind == "linear":
            vq.projection.set_value(vq.projection.get_value() + 0.1 * jax.random.normal(key, (3, 3)))
        codebook = np.asarray(vq.current_codebook(), np.float64)
        c = _nearest(z, codebook)
        grads = nnx.grad(lambda vq: vq(z)[2].loss)(vq)
        residual = z - codebook[c]
        if kind == "learned":
            expected = np.zeros_like(codebook)
            np.add.at(expected, c, -2 * residual / residual.size)
            np.testing.assert_allclose(grads["codebook"].get_value(), expected, rtol=1e-4, atol=1e-7)
        else:
            basis = np.asarray(vq.basis.get_value(), np.float64)
            expected = -2 * basis[c].T @ residual / residual.size
            np.testing.assert_allclose(grads["projection"].get_value(), expected, rtol=1e-4, atol=1e-7)
            np.testing.assert_array_equal(vq(z)[1], c)


def test_trains_with_optax_in_a_jitted_step(key):
    """A linear autoencoder with a SimVQ bottleneck and the rotation trick, Adam in an nnx.jit
    step: the reconstruction error falls well below the data's variance and codes stay in use."""
    x = _blobs(key, 512, 4, 16, spread=3.0)

    class AutoEncoder(nnx.Module):
        def __init__(self, rngs):
            self.enc = nnx.Linear(4, 4, rngs=rngs)
            self.vq = vqlib.nn.VectorQuantizer(32, 4, rngs=rngs, codebook="linear", rotation_trick=True)
            self.dec = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            z_q, _, stats = self.vq(self.enc(x))
            return self.dec(z_q), stats

    model = AutoEncoder(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x):
        def loss_fn(model):
            out, stats = model(x)
            error = jnp.mean((out - x) ** 2)
            return error + stats.loss, (error, stats.perplexity)

        (_, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return aux

    with jax.numpy_dtype_promotion("standard"):  # optax's Adam takes decay ** (int32 count)
        first, _ = step(model, opt, x)
        for _ in range(300):
            error, perplexity = step(model, opt, x)
    variance = float(np.mean(x.var(0)))
    # measured: error 0.98 of the variance at the first step, 0.26 after 300; perplexity 21 of 32 codes
    assert float(first) > 0.8 * variance
    assert float(error) < 0.4 * variance
    assert float(perplexity) > 12


# ----------------------------------------------------------------------------- bad input


def test_bad_arguments():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"^codebook must be one of \('ema', 'learned', 'linear'\), got 'kmeans'"):
        vqlib.nn.VectorQuantizer(4, 2, rngs=rngs, codebook="kmeans")
    with pytest.raises(ValueError, match=r"^decay must be in \[0, 1\), got 1.0"):
        vqlib.nn.VectorQuantizer(4, 2, rngs=rngs, decay=1.0)
    with pytest.raises(ValueError, match=r"^dead_code_threshold applies to codebook='ema' only"):
        vqlib.nn.VectorQuantizer(4, 2, rngs=rngs, codebook="linear", dead_code_threshold=1.0)
    with pytest.raises(ValueError, match=r"^num_codes must be >= 1, got 0"):
        vqlib.nn.VectorQuantizer(0, 2, rngs=rngs)
    with pytest.raises(ValueError, match=r"^z has dimension 3 but the codebook has d=2"):
        vqlib.nn.VectorQuantizer(4, 2, rngs=rngs)(np.zeros((5, 3), np.float32))
    z, cb = np.zeros((5, 2), np.float32), np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match=r"^codebook has dimension 2 but z has d=3"):
        vector_quantize(np.zeros((5, 3), np.float32), cb)
    with pytest.raises(ValueError, match=r"^commitment_cost must be a finite number >= 0, got -1"):
        vector_quantize(z, cb, commitment_cost=-1.0)
    with pytest.raises(ValueError, match=r"^z contains 1 NaN or inf values"):
        vector_quantize(np.where(np.arange(10).reshape(5, 2) == 3, np.inf, z), cb)
    state = ema_init(cb)
    with pytest.raises(ValueError, match=r"^codes must have shape \(5,\) \(one code per row of z\), got \(4,\)"):
        ema_update(state, z, np.zeros(4, np.int32))
    with pytest.raises(ValueError, match=r"^codes must lie in \[0, 2\)"):
        ema_update(state, z, np.full(5, 2, np.int32))
    with pytest.raises(ValueError, match=r"^threshold must be a finite number >= 0"):
        restart_dead_codes(state, z, threshold=-0.5)
