"""nnx layers: the DKM layer against `vqlib.codebooks.dkm`, palettisation end to end (train, eval,
export, save, load), post-training k-means against Lloyd's fixed point and scikit-learn."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.cluster import KMeans

import vqlib
from vqlib.codebooks import dkm


class Net(nnx.Module):
    def __init__(self, rngs, hidden=16):
        self.fc1 = nnx.Linear(8, hidden, rngs=rngs)
        self.bn = nnx.BatchNorm(hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, 8, rngs=rngs)  # both kernels 128 weights: one k-means compilation

    def __call__(self, x):
        return self.fc2(nnx.relu(self.bn(self.fc1(x))))


def _data(key, n=64):
    xkey, ykey = jax.random.split(key)
    return jax.random.normal(xkey, (n, 8)), jax.random.randint(ykey, (n,), 0, 8)


def test_dkm_layer_is_dkm_with_relative_tau_warm_start_and_schedule(key):
    w = jax.random.normal(key, (300, 1)) * 0.05
    start = jnp.quantile(w, jnp.array([0.1, 0.4, 0.6, 0.9]))[:, None]
    layer = vqlib.nn.DKM(start, tau=lambda step: 0.1 * 0.5**step, max_iter=2)
    var = float(jnp.var(w))
    soft, c1 = dkm(w, start, tau=0.1 * var, max_iter=2)
    np.testing.assert_allclose(layer(w), soft, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(layer.centroids.get_value(), c1, rtol=1e-6)  # warm start for the next call
    soft, c2 = dkm(w, c1, tau=0.05 * var, max_iter=2)  # step 1 of the schedule
    np.testing.assert_allclose(layer(w), soft, rtol=1e-6, atol=1e-8)
    assert int(layer.step.get_value()) == 2
    layer.eval()
    hard = np.asarray(c2)[np.abs(np.asarray(w) - np.asarray(c2).T).argmin(1)]
    np.testing.assert_array_equal(layer(w), hard)
    assert int(layer.step.get_value()) == 2  # eval neither counts nor moves the centroids


def test_trained_centroids_get_the_gradient_through_the_iterations(key):
    w = jax.random.normal(key, (300, 1))
    start = jnp.array([[-1.0], [0.0], [0.5], [1.0]])
    layer = vqlib.nn.DKM(start, tau=0.1, max_iter=3, train_centroids=True)
    grads = nnx.grad(lambda layer: jnp.sum(jnp.sin(layer(w))))(layer)
    expected = jax.grad(lambda c: jnp.sum(jnp.sin(dkm(w, c, tau=0.1 * jnp.var(w), max_iter=3)[0])))(start)
    np.testing.assert_allclose(grads["centroids"].get_value(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(layer.centroids.get_value(), start)  # moved by the optimizer only


def test_palettizer_trains_exports_saves_and_reloads(key, tmp_path):
    x, y = _data(key)
    model = Net(nnx.Rngs(0))
    pal = vqlib.nn.DKMPalettizer(model, bits=2, tau=0.02)
    opt = nnx.Optimizer(pal, optax.sgd(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(pal, opt, x, y):
        loss_fn = lambda pal: optax.softmax_cross_entropy_with_integer_labels(pal(x), y).mean()  # noqa: E731
        loss, grads = nnx.value_and_grad(loss_fn)(pal)
        opt.update(pal, grads)
        return loss

    before = np.asarray(model.fc1.kernel.get_value())
    losses = [float(step(pal, opt, x, y)) for _ in range(30)]
    assert losses[-1] < losses[0]
    assert not np.array_equal(model.fc1.kernel.get_value(), before)  # the float kernels are trained
    pal.eval()
    out = pal(x)
    compressed = vqlib.nn.export_palettized(pal)
    for name, shape in compressed.shapes:
        assert compressed.codes[name].dtype == np.uint8
        assert compressed.codes[name].shape == (math.ceil(math.prod(shape) * 2 / 8),)
        assert compressed.codebooks[name].shape == (4,)
    path = tmp_path / "net.vq"
    vqlib.save(path, compressed)
    loaded = vqlib.nn.load_palettized(Net(nnx.Rngs(1)), vqlib.load(path, expect=vqlib.nn.PalettizedModel))
    loaded.eval()
    np.testing.assert_allclose(loaded(x), out, rtol=1e-6, atol=1e-6)  # eval mode is what is exported
    for kernel, name in ((loaded.fc1.kernel, "fc1/kernel"), (loaded.fc2.kernel, "fc2/kernel")):
        assert set(np.unique(kernel.get_value())) <= set(np.asarray(compressed.codebooks[name]))
    np.testing.assert_array_equal(loaded.bn.mean.get_value(), model.bn.mean.get_value())


def test_palettizer_writes_batch_statistics_back(key):
    """One training call updates the wrapped model's BatchNorm statistics as the model itself
    would with its kernels replaced by their soft DKM clustering."""
    x, _ = _data(key)
    model = Net(nnx.Rngs(0))
    pal = vqlib.nn.DKMPalettizer(model, bits=2, tau=0.05)
    twin = nnx.clone(model)
    layers = dict(zip(pal.names, pal.layers, strict=True))
    for layer, name in ((twin.fc1, "fc1/kernel"), (twin.fc2, "fc2/kernel")):
        w = layer.kernel.get_value()
        soft, _ = dkm(w.reshape(-1, 1), layers[name].centroids.get_value(), tau=0.05 * jnp.var(w), max_iter=3)
        layer.kernel.set_value(soft.reshape(w.shape))
    pal(x)
    twin(x)
    np.testing.assert_allclose(model.bn.mean.get_value(), twin.bn.mean.get_value(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.bn.var.get_value(), twin.bn.var.get_value(), rtol=1e-5, atol=1e-7)


def test_palettize_kmeans_is_a_converged_kmeans(key):
    model = Net(nnx.Rngs(3))
    p = vqlib.nn.palettize_kmeans(model, bits=2)
    loaded = vqlib.nn.load_palettized(model, p)
    for name, layer, back in (("fc1/kernel", model.fc1, loaded.fc1), ("fc2/kernel", model.fc2, loaded.fc2)):
        w = np.asarray(layer.kernel.get_value(), np.float64).ravel()
        values = np.asarray(p.codebooks[name], np.float64)
        codes = np.abs(w[:, None] - values[None]).argmin(1)
        np.testing.assert_array_equal(np.asarray(back.kernel.get_value()).ravel(), values[codes].astype(np.float32))
        for j in range(4):  # Lloyd's fixed point: every value is the mean of its weights
            np.testing.assert_allclose(values[j], w[codes == j].mean(), rtol=1e-5, atol=1e-7)
        inertia = ((w - values[codes]) ** 2).sum()
        sk = KMeans(4, n_init=5, random_state=0).fit(w[:, None])
        # one k-means++ start vs scikit-learn's best of 5; measured: 1.000 (fc1), 1.031 (fc2)
        assert inertia <= 1.1 * sk.inertia_
    np.testing.assert_array_equal(loaded.fc1.bias.get_value(), model.fc1.bias.get_value())


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits", [0, 9, 2.5, True, "2"])
def test_bits_out_of_range(bits):
    model = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^bits must be an int from 1 to 8"):
        vqlib.nn.palettize_kmeans(model, bits=bits)
    with pytest.raises(ValueError, match=r"^bits must be an int from 1 to 8"):
        vqlib.nn.DKMPalettizer(model, bits=bits)


def test_kernel_smaller_than_the_palette():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))  # 6 weights
    with pytest.raises(ValueError, match=r"^kernel kernel has 6 weights, fewer than the 2\*\*bits=8 .* use bits <= 2"):
        vqlib.nn.palettize_kmeans(model, bits=3)
    with pytest.raises(ValueError, match=r"^the model has no kernels"):
        vqlib.nn.DKMPalettizer(nnx.BatchNorm(4, use_bias=True, use_scale=False, rngs=nnx.Rngs(0)), bits=1)


def test_dkm_layer_arguments():
    with pytest.raises(ValueError, match=r"^tau must be a finite number > 0, got 0.0"):
        vqlib.nn.DKM(jnp.zeros((4, 1)), tau=0.0)
    with pytest.raises(ValueError, match=r"^centroids must be 2-D, got shape \(4,\)"):
        vqlib.nn.DKM(jnp.zeros((4,)))
    with pytest.raises(ValueError, match=r"^centroids has k=4 rows but w has n=3 rows"):
        vqlib.nn.DKM(jnp.zeros((4, 1)))(jnp.ones((3, 1)))


def test_load_into_another_architecture(key):
    p = vqlib.nn.palettize_kmeans(Net(nnx.Rngs(0)), bits=2)
    with pytest.raises(ValueError, match=r"^variable bn/bias has shape \(8,\) in the model but \(16,\) stored"):
        vqlib.nn.load_palettized(Net(nnx.Rngs(0), hidden=8), p)
    with pytest.raises(ValueError, match=r"^the model does not match the palettized one: variables only in the model"):
        vqlib.nn.load_palettized(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), p)
    with pytest.raises(TypeError, match=r"^export_palettized expects a vqlib.nn.DKMPalettizer, got Net"):
        vqlib.nn.export_palettized(Net(nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"^palettized must be a vqlib.nn.PalettizedModel, got dict"):
        vqlib.nn.load_palettized(Net(nnx.Rngs(0)), {})
