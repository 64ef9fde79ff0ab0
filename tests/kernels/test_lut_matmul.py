"""vqlib.kernels.lut_matmul, every implementation, against a float64 numpy decode-and-matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_impls import impl_kwargs, impls_of

from vqlib.codebooks._e8 import _decode_e8p, _e8p_patterns
from vqlib.kernels import BACKENDS, dequantize, lut_matmul, lut_weight

OUT, IN = 48, 128
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


def _weight(kind, key):
    ks = jax.random.split(key, 3)
    scales = jax.random.uniform(ks[2], (OUT,), minval=0.5, maxval=1.5)
    if kind == "scalar":  # 3-bit codes, a codebook per row and 32 columns, uint8 storage
        codes = jax.random.randint(ks[0], (1, OUT, IN), 0, 8).astype(jnp.uint8)
        return lut_weight("scalar", codes, jax.random.normal(ks[1], (OUT, IN // 32, 8)), scales, group=32)
    if kind == "vq":  # one shared codebook of 16 vectors of 4
        return lut_weight(
            "vq", jax.random.randint(ks[0], (1, OUT, IN // 4), 0, 16), jax.random.normal(ks[1], (1, 16, 4))
        )
    if kind == "pq":  # a codebook per block of 2 columns
        codes = jax.random.randint(ks[0], (1, OUT, IN // 2), 0, 4)
        return lut_weight("vq", codes, jax.random.normal(ks[1], (IN // 2, 4, 2)), scales)
    if kind == "aq":  # 3 additive codebooks of 16 vectors of 8
        codes = jax.random.randint(ks[0], (3, OUT, IN // 8), 0, 16).astype(jnp.uint8)
        return lut_weight("aq", codes, jax.random.normal(ks[1], (3, 16, 8)), scales)
    codes = jax.random.randint(ks[0], (1, OUT, IN // 8), 0, 65536)
    return lut_weight("e8p", codes, jnp.asarray(_e8p_patterns()) / 2, scales)


def _decode64(w):
    """float64 numpy decoding, written independently of the library's jnp decode."""
    codes = np.asarray(w.codes, np.int64)
    cb = np.asarray(w.codebooks, np.float64)
    m, out, groups = codes.shape
    if w.kind == "scalar":
        cols = np.arange(groups)
        dense = cb[np.arange(out)[:, None], (cols // w.group)[None, :], codes[0]]
    elif w.kind == "vq":
        dense = np.stack([cb[j % cb.shape[0]][codes[0, :, j]] for j in range(groups)], 1).reshape(out, -1)
    elif w.kind == "aq":
        dense = sum(cb[i][codes[i]] for i in range(m)).reshape(out, -1)
    else:
        dense = np.asarray(_decode_e8p(jnp.asarray(codes[0], jnp.int32)), np.float64).reshape(out, -1)
    return dense * np.asarray(w.scales, np.float64)[:, None]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch", [1, 19])
@pytest.mark.parametrize("kind", ["scalar", "vq", "pq", "aq", "e8p"])
@pytest.mark.parametrize("impl", [name for name in impls_of(BACKENDS["lut_matmul"]) if "tpu" not in name])
def test_every_impl_matches_float64(impl, kind, batch, dtype, key):
    kw = impl_kwargs(impl)
    kw_, kx = jax.random.split(key)
    w = _weight(kind, kw_)
    x = jax.random.normal(kx, (batch, IN)).astype(dtype)
    y = lut_matmul(x, w, **kw)
    assert y.shape == (batch, OUT) and y.dtype == dtype
    w64 = _decode64(w)
    want = np.asarray(x, np.float64) @ w64.T
    scale = np.abs(np.asarray(x, np.float64)) @ np.abs(w64).T  # bound on the rounding of each sum
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - want), TOL[dtype] * scale + 1e-6)


def test_dequantize_matches_e8p_codebook_decode(key):
    w = _weight("e8p", key)
    np.testing.assert_allclose(np.asarray(dequantize(w)), _decode64(w), rtol=1e-6)


def test_errors():
    w = _weight("vq", jax.random.key(0))
    with pytest.raises(ValueError, match="dimension 64"):
        lut_matmul(jnp.ones((2, 64)), w)
    with pytest.raises(TypeError, match="LUTWeight"):
        lut_matmul(jnp.ones((2, IN)), jnp.ones((OUT, IN)))
    with pytest.raises(ValueError, match="group"):
        lut_weight("scalar", jnp.zeros((1, 4, 10), jnp.int32), jnp.zeros((4, 3, 2)), group=3)
    with pytest.raises(ExceptionGroup) as info:  # in // v = 5 is no tensor-core tile
        lut_matmul(
            jnp.ones((1, 20)),
            lut_weight("vq", jnp.zeros((1, 16, 5), jnp.int32), jnp.ones((1, 2, 4))),
            impl="pallas_gpu",
            interpret=True,
        )
    assert info.group_contains(NotImplementedError, match="divisible by 16")
    with pytest.raises(ValueError, match="impl must be one of"):
        lut_matmul(jnp.ones((2, IN)), w, impl="pallas_tpu")
