"""E8 lattice and QuIP#'s E8P against brute force in float64 and the figures in ALGORITHMS.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vqlib
from vqlib.codebooks import E8Codebook, nearest_e8, pack_codes, unpack_codes


def e8_points_in_box() -> np.ndarray:
    """Every point of E8 = D8 u (D8 + 1/2) with all coordinates in [-2, 2], float64."""
    found = []
    for values in (np.arange(-2.0, 2.5), np.array([-1.5, -0.5, 0.5, 1.5])):
        grid = np.stack(np.meshgrid(*[values] * 8, indexing="ij"), -1).reshape(-1, 8)
        found.append(grid[np.sum(grid, 1) % 2 == 0])
    return np.concatenate(found)


def brute_force_nearest(y: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The nearest row of points to each row of y, float64, 200 rows at a time."""
    norms = np.sum(points**2, 1)[None]
    return np.concatenate(
        [points[np.argmin(norms - 2 * chunk @ points.T, 1)] for chunk in np.split(y, range(200, len(y), 200))]
    )


def on_e8(p: np.ndarray) -> np.ndarray:
    """Rows of p that are E8 points: all integer or all half-integer, even coordinate sum."""
    doubled = 2 * p
    integral = np.all(np.abs(doubled - np.round(doubled)) < 1e-6, 1)
    parity = np.round(doubled).astype(int) % 2
    same_coset = np.all(parity == parity[:, :1], 1)
    return integral & same_coset & (np.round(np.sum(p, 1)).astype(int) % 2 == 0)


def e8p_codewords() -> np.ndarray:
    cb = E8Codebook(jnp.ones((), jnp.float32), None, 8, 2, "e8p")
    return np.asarray(vqlib.decode(cb, jnp.arange(2**16, dtype=jnp.int32)[:, None]), np.float64)


@pytest.fixture(scope="module")
def box_points():
    return e8_points_in_box()


# ----------------------------------------------------------------------------- the lattice


def test_nearest_point_equals_brute_force(box_points, key):
    # The covering radius of E8 is 1, so the nearest point to y in [-1, 1]^8 lies in [-2, 2]^8.
    y = np.asarray(jax.random.uniform(key, (300, 8), minval=-1.0, maxval=1.0), np.float64)
    got = np.asarray(nearest_e8(jnp.asarray(y, jnp.float32)), np.float64)
    want = brute_force_nearest(y, box_points)
    np.testing.assert_allclose(np.sum((y - got) ** 2, 1), np.sum((y - want) ** 2, 1), atol=1e-5)
    np.testing.assert_array_equal(got, want)  # no ties on continuous inputs


def test_nearest_point_is_translation_equivariant_and_within_the_covering_radius(key):
    y = jax.random.uniform(key, (2000, 8), minval=-20.0, maxval=20.0)
    shift = 2.0 * jnp.round(y / 2.0)  # (2Z)^8 is a sublattice of E8
    p = np.asarray(nearest_e8(y), np.float64)
    np.testing.assert_allclose(p - np.asarray(shift), np.asarray(nearest_e8(y - shift)), atol=1e-5)
    assert on_e8(p).all()
    assert np.max(np.linalg.norm(np.asarray(y, np.float64) - p, axis=1)) <= 1.0 + 1e-5


def test_uniform_error_is_the_normalized_second_moment_of_e8(key):
    # G(E8) = 0.0716821 (Conway & Sloane; Z^8 would give 1/12 = 0.0833); measured 0.0717 here.
    y = jax.random.uniform(key, (20000, 8), minval=-50.0, maxval=50.0)
    err = np.sum((np.asarray(y, np.float64) - np.asarray(nearest_e8(y), np.float64)) ** 2, 1) / 8
    stderr = np.std(err) / np.sqrt(len(err))  # ~1.1e-4
    assert abs(np.mean(err) - 0.0716821) < 4 * stderr


@pytest.mark.parametrize(
    "bits,counts", [(1, {0: 1, 2: 240, 4: 15}), (2, {0: 1, 2: 240, 4: 2160, 6: 6720, 8: 17520, 10: 30240, 12: 8655})]
)
def test_e8_codebook_is_the_smallest_shells(bits, counts):
    # E8 theta series: 1, 240, 2160, 6720, 17520, 30240, 60480 points of norm^2 0, 2, 4, ..., 12
    cb = E8Codebook(jnp.ones((), jnp.float32), None, 8, bits, "e8")
    points = np.asarray(vqlib.decode(cb, jnp.arange(2 ** (8 * bits), dtype=jnp.int32)[:, None]), np.float64)
    assert len(np.unique(points, axis=0)) == 2 ** (8 * bits)
    assert on_e8(points).all()
    norms, found = np.unique(np.round(np.sum(points**2, 1)).astype(int), return_counts=True)
    assert dict(zip(norms.tolist(), found.tolist(), strict=True)) == counts
    if bits == 1:  # QuIP#'s E81B: the partial shell is 15 of the +-2 e_i
        assert np.all(np.sort(np.abs(points[np.sum(points**2, 1) > 3]), 1)[:, -1] == 2)


@pytest.mark.parametrize("bits", [1, 2])
def test_e8_encoding_is_the_nearest_lattice_point_inside_the_shell(bits, key):
    x = jax.random.normal(key, (1000, 16))
    cb = vqlib.fit(x, "e8", bits=bits)  # the shapes of fit_e8's example: compiled once
    y = np.asarray(x, np.float64).reshape(-1, 8) / float(cb.step)
    got = np.asarray(vqlib.decode(cb, vqlib.encode(cb, x)), np.float64).reshape(-1, 8) / float(cb.step)
    lattice = np.asarray(nearest_e8(jnp.asarray(y, jnp.float32)), np.float64)
    inside = np.sum(lattice**2, 1) <= (2 if bits == 1 else 10) + 1e-6  # complete shells: surely in the codebook
    np.testing.assert_allclose(got[inside], lattice[inside], atol=1e-5)
    assert inside.mean() > 0.3  # measured 0.48 (bits=1), 0.99 (bits=2)
    assert on_e8(got).all()  # overloaded blocks are shrunk onto a codebook point, still on the lattice
    shell = 4 if bits == 1 else 12
    assert np.max(np.sum(got**2, 1)) <= shell + 1e-5


# ----------------------------------------------------------------------------- E8P


def test_e8p_has_65536_distinct_codewords_in_e8_plus_a_quarter():
    grid = e8p_codewords()
    assert len(np.unique(grid, axis=0)) == 2**16
    assert on_e8(grid - 0.25).all()
    unshifted = grid - np.where(np.arange(2**16) & 1, 0.25, -0.25)[:, None]  # code bit 0: the +-1/4 shift
    absolute = np.unique(np.abs(unshifted), axis=0)
    assert len(absolute) == 256
    norms = np.sum(absolute**2, 1)
    assert np.sum(norms <= 10 + 1e-9) == 227 and np.sum(np.abs(norms - 12) < 1e-9) == 29


def test_e8p_encoder_is_exact_and_round_trips():
    grid = e8p_codewords()
    cb = E8Codebook(jnp.ones((), jnp.float32), None, 8, 2, "e8p")
    codes = jnp.arange(2**16, dtype=jnp.int32)[:, None]
    np.testing.assert_array_equal(vqlib.encode(cb, jnp.asarray(grid, jnp.float32)), codes)
    y = np.random.default_rng(0).normal(size=(1000, 8)) * 1.03
    got = grid[np.asarray(vqlib.encode(cb, jnp.asarray(y, jnp.float32)))[:, 0]]
    want = brute_force_nearest(y, grid)
    np.testing.assert_allclose(np.sum((y - got) ** 2, 1), np.sum((y - want) ** 2, 1), atol=1e-5)


@pytest.mark.parametrize("rms_scale,published", [(1.03, 0.0919), (0.90, 0.0994)])
def test_e8p_mse_per_weight_on_gaussian_data(rms_scale, published, key):
    # ALGORITHMS.md (brute force over all 65,536 codewords): MSE 0.0919 at s = 1.03, 0.0994 at
    # s = 0.90, on i.i.d. N(0, 1) weights. 16,384 blocks: standard error ~0.4%; allow 2%.
    x = jax.random.normal(key, (2048, 64))
    cb = vqlib.fit(x, "e8p", rms_scale=rms_scale)  # RHT in front, as in QuIP#
    mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(vqlib.decode(cb, vqlib.encode(cb, x)))) ** 2))
    assert abs(mse - published) < 0.02 * published
    assert mse > 4.0**-2  # the Gaussian rate-distortion bound at 2 bits


def test_e8p_residual_stacking_lowers_the_error(key):
    x = jax.random.normal(key, (1000, 16))  # the examples' shapes: compiled once
    errors = {}
    for bits in (2, 3, 4):
        cb = vqlib.fit(x, "e8p", bits=bits)
        assert vqlib.code_layout(cb).num_codebooks == (16 // 8) * (1 if bits == 2 else 2)
        errors[bits] = float(np.mean((np.asarray(x) - np.asarray(vqlib.decode(cb, vqlib.encode(cb, x)))) ** 2))
    # measured 0.091, 0.029, 0.0087; the Gaussian bound is 4^-b (0.0625, 0.0156, 0.0039)
    assert errors[2] > errors[3] > errors[4] > 4.0**-4
    assert errors[3] < 0.5 * errors[2] and errors[4] < 0.5 * errors[3]


# ----------------------------------------------------------------------------- the codebook protocol


@pytest.mark.parametrize("method,options", [("e8", dict(bits=1)), ("e8p", dict(bits=2)), ("e8p", dict(bits=4))])
def test_packing_and_save_load(method, options, tmp_path, key):
    x = jax.random.normal(key, (1000, 16))  # the examples' shapes: compiled once
    cb = vqlib.fit(x, method, **options)
    codes = vqlib.encode(cb, x)
    layout = vqlib.code_layout(cb)
    assert codes.dtype == jnp.int32 and codes.shape == (1000, layout.num_codebooks)
    packed = pack_codes(codes, layout.bits)
    assert packed.shape == (1000, -(-layout.bits_per_vector // 8))
    np.testing.assert_array_equal(unpack_codes(packed, layout.bits, layout.num_codebooks), codes)
    vqlib.save(tmp_path / "cb.vq", cb)
    back = vqlib.load(tmp_path / "cb.vq")
    np.testing.assert_array_equal(vqlib.decode(back, codes), vqlib.decode(cb, codes))
    np.testing.assert_array_equal(vqlib.encode(back, x), codes)


def test_per_head_codebooks_vmap_and_jit(key):
    heads, x = 3, jax.random.normal(key, (3, 100, 16))
    keys = jax.random.split(key, heads)
    cbs = jax.vmap(lambda k, xs: vqlib.codebooks.fit_e8p(k, xs))(keys, x)
    codes = jax.jit(jax.vmap(vqlib.encode))(cbs, x)
    for h in range(heads):
        one = vqlib.codebooks.fit_e8p(keys[h], x[h])
        np.testing.assert_allclose(one.step, cbs.step[h], rtol=1e-6)
        np.testing.assert_array_equal(vqlib.encode(one, x[h]), codes[h])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("method,bits", [("e8", 0), ("e8", 3), ("e8p", 1), ("e8p", 5)])
def test_bits_out_of_range(method, bits):
    with pytest.raises(ValueError, match="bits must be"):
        vqlib.fit(np.zeros((4, 8), np.float32), method, bits=bits)


@pytest.mark.parametrize("method", ["e8", "e8p"])
def test_d_not_a_multiple_of_8_says_how_to_pad(method):
    with pytest.raises(ValueError, match=r"d=12, not a multiple of the E8 block of 8 .* zero columns to d=16"):
        vqlib.fit(np.zeros((4, 12), np.float32), method)


def test_other_bad_input():
    x = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match="x contains 1 NaN or inf"):
        vqlib.fit(np.where(np.arange(32).reshape(4, 8) == 5, np.inf, x), "e8p")
    with pytest.raises(ValueError, match="rotation must be one of"):
        vqlib.fit(x, "e8p", rotation="walsh")
    with pytest.raises(ValueError, match="rms_scale must be a finite number > 0"):
        vqlib.fit(x, "e8p", rms_scale=0.0)
    cb = E8Codebook(jnp.ones((), jnp.float32), None, 16, 1, "e8")
    with pytest.raises(ValueError, match="x has dimension 8 but the codebook was fitted on d=16"):
        vqlib.encode(cb, x)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 256\)"):
        vqlib.decode(cb, np.full((2, 2), 256, np.int32))
    with pytest.raises(ValueError, match=r"codes must have shape \(\.\.\., 2\)"):
        vqlib.decode(cb, np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 8\)"):
        nearest_e8(jnp.zeros((3, 4)))
