"""Bad input to the PQ / OPQ / RVQ / AQ entry points: a clear error before any fitting or coding."""

import jax
import numpy as np
import pytest

import vqlib
from vqlib.codebooks import AdditiveCodebook, ProductCodebook, _additive, _kmeans, _product


@pytest.fixture(autouse=True)
def no_expensive_work(monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("expensive work started before the input was validated")

    for module, name in [(_kmeans, "_fit"), (_product, "_encode"), (_product, "_decode"), (_product, "_tables")]:
        monkeypatch.setattr(module, name, no_work)
    for name in ("_encode", "_decode", "_fit_stages"):
        monkeypatch.setattr(_additive, name, no_work)


@pytest.fixture
def x():
    return np.random.default_rng(0).normal(size=(40, 10)).astype(np.float32)


@pytest.fixture
def pq():
    return ProductCodebook(np.zeros((2, 4, 5), np.float32))


@pytest.fixture
def aq():
    return AdditiveCodebook(np.zeros((3, 4, 10), np.float32), beam=2)


@pytest.mark.parametrize("method", ["pq", "opq"])
def test_d_not_divisible_by_m_says_how_to_pad(x, method):
    with pytest.raises(ValueError, match=r"d=10 is not divisible by m=4; pad the vectors with zero columns to 12"):
        vqlib.fit(x, method, m=4)


@pytest.mark.parametrize("method", ["pq", "opq", "rvq", "aq"])
def test_k_larger_than_n(x, method):
    with pytest.raises(ValueError, match=r"k=64 is larger than the number of vectors n=40"):
        vqlib.fit(x, method, m=2, k=64)


@pytest.mark.parametrize("method", ["pq", "rvq", "aq"])
def test_m_must_be_positive(x, method):
    with pytest.raises(ValueError, match="m must be >= 1"):
        vqlib.fit(x, method, m=0, k=4)


@pytest.mark.parametrize("method", ["rvq", "aq"])
def test_beam_must_be_positive(x, method):
    with pytest.raises(ValueError, match="beam must be >= 1"):
        vqlib.fit(x, method, m=2, k=4, beam=0)


def test_nonfinite_x(x):
    x[3, 3] = np.nan
    with pytest.raises(ValueError, match=r"x contains 1 NaN"):
        vqlib.fit(x, "aq", m=2, k=4)


def test_missing_m(x):
    with pytest.raises(TypeError, match=r"method 'pq' needs option\(s\) \['m'\]"):
        vqlib.fit(x, "pq")


@pytest.mark.parametrize("fixture,width", [("pq", 2), ("aq", 3)])
def test_codes_of_the_wrong_width(request, fixture, width):
    cb = request.getfixturevalue(fixture)
    with pytest.raises(ValueError, match=rf"codes must have shape \(\.\.\., {width}\) for this codebook"):
        vqlib.decode(cb, np.zeros((5, width + 1), np.int32))


@pytest.mark.parametrize("fixture", ["pq", "aq"])
def test_codes_out_of_range(request, fixture):
    cb = request.getfixturevalue(fixture)
    codes = np.zeros((5, vqlib.code_layout(cb).num_codebooks), np.int32)
    codes[2, 0] = 4
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"):
        vqlib.decode(cb, codes)


@pytest.mark.parametrize("fixture", ["pq", "aq"])
def test_encode_dimension_mismatch(request, fixture):
    with pytest.raises(ValueError, match="x has dimension 7 but the codebook was fitted on d=10"):
        vqlib.encode(request.getfixturevalue(fixture), np.zeros((3, 7), np.float32))


@pytest.mark.parametrize("fixture", ["pq", "aq"])
def test_tables_bad_metric_and_queries(request, fixture):
    cb = request.getfixturevalue(fixture)
    with pytest.raises(ValueError, match=r"metric must be one of \('l2', 'ip'\)"):
        vqlib.adc_tables(cb, np.zeros((2, 10), np.float32), metric="cos")
    with pytest.raises(ValueError, match="queries has dimension 3"):
        vqlib.adc_tables(cb, np.zeros((2, 3), np.float32))


def test_loading_a_pq_file_as_aq(tmp_path, pq):
    path = tmp_path / "pq.vq"
    vqlib.save(path, pq)
    with pytest.raises(ValueError, match="holds a vqlib.ProductCodebook, not the expected vqlib.AdditiveCodebook"):
        vqlib.load(path, expect=AdditiveCodebook)


def test_composition_bad_input(x):
    with pytest.raises(TypeError, match="residual\\(\\) takes one or more Quantizers"):
        vqlib.residual("kmeans")
    with pytest.raises(TypeError, match="unknown option"):
        vqlib.quantizer("pq", m=2, beam=3)
    with pytest.raises(ValueError, match="dim_weights must be > 0"):
        vqlib.dim_weighted(vqlib.quantizer("pq", m=2), np.zeros(10, np.float32))
    q = vqlib.dim_weighted(vqlib.quantizer("pq", m=2), np.ones(4, np.float32))
    with pytest.raises(ValueError, match="x has dimension 10 but dim_weights has d=4"):
        q.fit(jax.random.key(0), x)
