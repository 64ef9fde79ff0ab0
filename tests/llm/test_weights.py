"""`linear` on LUTWeight / CompressedWeight against numpy decodings written from the format docs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vqlib
from vqlib.codebooks import E8Codebook, random_rotation, rotate
from vqlib.kernels import lut_weight
from vqlib.llm import CompressedWeight, PackedRotation, linear
from vqlib.llm._weights import coded_part, decode_rows, stored_bits

RNG = np.random.default_rng(0)


def _x(n_in, rows=5):
    return RNG.normal(size=(rows, n_in)).astype(np.float32)


def _lut_cases():
    out, n_in = 6, 16
    codes = RNG.integers(0, 4, size=(1, out, n_in))
    cb = RNG.normal(size=(out, n_in // 4, 4)).astype(np.float32)  # scalar, group 4
    scalar = np.stack([[cb[o, c // 4, codes[0, o, c]] for c in range(n_in)] for o in range(out)])
    yield lut_weight("scalar", codes, cb, group=4), scalar
    codes = RNG.integers(0, 8, size=(1, out, n_in // 2))
    cb = RNG.normal(size=(n_in // 2, 8, 2)).astype(np.float32)  # vq, one codebook per column block
    scales = RNG.uniform(0.5, 2, size=out).astype(np.float32)
    vq = np.stack([np.concatenate([cb[j, codes[0, o, j]] for j in range(n_in // 2)]) for o in range(out)])
    yield lut_weight("vq", codes, cb, scales), vq * scales[:, None]
    codes = RNG.integers(0, 16, size=(3, out, n_in // 8))
    cb = RNG.normal(size=(3, 16, 8)).astype(np.float32)
    aq = np.stack(
        [np.concatenate([sum(cb[i, codes[i, o, j]] for i in range(3)) for j in range(2)]) for o in range(out)]
    )
    yield lut_weight("aq", codes, cb), aq


@pytest.mark.parametrize("case", range(3))
def test_linear_on_lut_weight_equals_float_matmul(case):
    w, dense = list(_lut_cases())[case]
    x = _x(w.shape[1])
    np.testing.assert_allclose(linear(x, w), x @ dense.T, rtol=1e-5, atol=1e-5)
    rows = jnp.array([4, 0, 4])
    np.testing.assert_allclose(decode_rows(w, rows), dense[[4, 0, 4]], rtol=1e-6, atol=1e-6)


def _affine_dense(codes, side, group, n_in):
    out = codes.shape[0]
    steps, offsets = side[..., 0].astype(np.float32), side[..., 1].astype(np.float32)
    cols = np.arange(n_in) // group
    return offsets[np.arange(out)[:, None], cols] + steps[np.arange(out)[:, None], cols] * codes


def test_affine_part_with_a_short_last_group():
    out, n_in, group, bits = 4, 20, 8, 3  # groups of 8, 8 and 4 columns
    codes = RNG.integers(0, 8, size=(out, n_in))
    side = RNG.normal(size=(out, 3, 2)).astype(np.float16)
    part = coded_part("affine", codes[None], side, np.ones(1), bits=bits, group=group, shape=(out, n_in))
    w = CompressedWeight((part,))
    dense = _affine_dense(codes, side, group, n_in)
    x = _x(n_in)
    np.testing.assert_allclose(linear(x, w), x @ dense.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(decode_rows(w, jnp.array([2, 1])), dense[[2, 1]], rtol=1e-6, atol=1e-6)
    # stored: 20 codes x 3 bits = 8 bytes per row, 3 groups x (step, offset) float16, one float16 scale
    assert stored_bits(w) == 8 * (out * 8 + out * 3 * 2 * 2 + 2)


def test_scalar_and_vq_parts_share_codebooks_across_rows():
    out, n_in = 3, 12
    codes = RNG.integers(0, 4, size=(out, n_in))
    cb = RNG.normal(size=(2, 4)).astype(np.float16)  # two groups of 6 columns
    w = CompressedWeight((coded_part("scalar", codes[None], cb, np.ones(1), bits=2, group=6, shape=(out, n_in)),))
    dense = cb.astype(np.float32)[np.arange(n_in)[None, :] // 6, codes]
    x = _x(n_in)
    np.testing.assert_allclose(linear(x, w), x @ dense.T, rtol=1e-5, atol=1e-5)
    vcodes = RNG.integers(0, 8, size=(out, n_in // 2))
    vcb = RNG.normal(size=(3, 8, 2)).astype(np.float16)  # three groups of 4 columns, 2-dim codebooks
    scales = np.array([1.0, 0.5, 2.0], np.float16)
    w = CompressedWeight((coded_part("vq", vcodes[None], vcb, scales, bits=3, group=4, shape=(out, n_in)),))
    pieces = vcb.astype(np.float32)[np.arange(n_in // 2)[None, :] // 2, vcodes]  # (out, 6, 2)
    dense = pieces.reshape(out, n_in) * scales.astype(np.float32)[:, None]
    np.testing.assert_allclose(linear(x, w), x @ dense.T, rtol=1e-5, atol=1e-5)


def _dense_rotation(rot):
    return np.asarray(rotate(rot, jnp.eye(rot.signs.shape[0])), np.float64).T  # rotate(I) = I R^T


def test_lattice_parts_between_rotations():
    out, n_in = 24, 16
    rin, rout = random_rotation(jax.random.key(1), n_in), random_rotation(jax.random.key(2), out)
    c1 = RNG.integers(0, 2**16, size=(out, n_in // 8))
    c2 = RNG.integers(0, 256, size=(out, n_in // 8))
    parts = (
        coded_part("e8p", c1[None], None, np.array([0.5]), bits=16, shape=(out, n_in)),
        coded_part("e8", c2[None], None, np.array([0.125]), bits=8, shape=(out, n_in)),
    )
    w = CompressedWeight(parts, PackedRotation.of(rin), PackedRotation.of(rout))
    one = jnp.ones((), jnp.float32)
    stage1 = np.asarray(vqlib.decode(E8Codebook(one, None, 8, 2, "e8p"), c1.reshape(-1, 1))).reshape(out, n_in)
    stage2 = np.asarray(vqlib.decode(E8Codebook(one, None, 8, 1, "e8"), c2.reshape(-1, 1))).reshape(out, n_in)
    inner = 0.5 * stage1 + 0.125 * stage2
    dense = _dense_rotation(rout).T @ inner @ _dense_rotation(rin)  # W = R_out^T (sum) R_in
    x = _x(n_in)
    np.testing.assert_allclose(linear(x, w), x @ dense.T, rtol=1e-4, atol=1e-4)
    emb = CompressedWeight(parts, PackedRotation.of(rin))
    np.testing.assert_allclose(
        decode_rows(emb, jnp.array([3, 7])), (inner @ _dense_rotation(rin))[[3, 7]], rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError, match="output-side rotation"):
        decode_rows(w, jnp.array([0]))


def test_packed_rotation_round_trip():
    rot = random_rotation(jax.random.key(3), 40)
    back = PackedRotation.of(rot).rotation()
    np.testing.assert_array_equal(back.signs, rot.signs)
    assert stored_bits(PackedRotation.of(rot)) == 8 * (5 + 4 * rot.factor.size)  # 40 sign bits + float32 factor


def test_codes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError):
        coded_part("affine", np.full((1, 2, 8), 9), np.zeros((2, 1, 2)), np.ones(1), bits=3, group=8, shape=(2, 8))
    with pytest.raises(ValueError, match="kind"):
        coded_part("pq", np.zeros((1, 2, 8), int), None, np.ones(1), bits=3, shape=(2, 8))


def test_float_linear_checks_shapes():
    with pytest.raises(ValueError, match="cannot multiply"):
        linear(jnp.ones((2, 3)), jnp.ones((4, 5)))
