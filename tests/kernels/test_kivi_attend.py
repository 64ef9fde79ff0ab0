"""vqlib.kernels.kivi_attend (the C++ kernel and the jnp reference) against a float64 numpy oracle."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlib.kernels import kivi_attend
from vqlib.kernels._kv_attend import native


def _store(rng, b, n, kvh, hd, bits, group):
    w = hd * bits // 8
    codes = lambda: rng.integers(0, 256, (b, n, kvh, w)).astype(np.uint8)  # noqa: E731
    f16 = lambda lo, hi, shape: rng.uniform(lo, hi, shape).astype(np.float16)  # noqa: E731
    return dict(
        key_codes=codes(), key_scale=f16(0.01, 0.5, (b, n // group, kvh, hd)),
        key_zero=f16(-2, 2, (b, n // group, kvh, hd)), value_codes=codes(),
        value_scale=f16(0.01, 0.5, (b, n, kvh, hd // group)), value_zero=f16(-2, 2, (b, n, kvh, hd // group)),
    )  # fmt: skip


def _oracle(q, st, lo, hi, bits, group):
    """float64: codes read bit by bit (little-endian fields), then an exact softmax over [lo, hi)."""

    def unpack(packed, hd):
        bitstream = np.unpackbits(packed, axis=-1, bitorder="little").reshape(*packed.shape[:-1], hd, bits)
        return (bitstream * (1 << np.arange(bits))).sum(-1).astype(np.float64)

    hd = q.shape[-1]
    n = st["key_codes"].shape[1]
    grp = np.arange(n) // group
    k = unpack(st["key_codes"], hd) * st["key_scale"].astype(np.float64)[:, grp] + st["key_zero"][:, grp]
    vs = np.repeat(st["value_scale"].astype(np.float64), group, axis=-1)
    v = unpack(st["value_codes"], hd) * vs + np.repeat(st["value_zero"].astype(np.float64), group, axis=-1)
    s = np.einsum("bkrd,bnkd->bkrn", q.astype(np.float64), k)[..., lo:hi]
    m = s.max(-1)
    p = np.exp(s - m[..., None])
    return m, p.sum(-1), np.einsum("bkrn,bnkd->bkrd", p, v[:, lo:hi])


def _impl(name):
    if name == "native" and not native.available():
        pytest.skip(f"the native kernel is not available here: {native.why_not()}")
    return name


# (b, n, kvh, r, hd, group, lo, hi): one position in groups of 64; a range inside one group;
# across groups with ragged ends; the whole store; b > 1 with a head_dim of 128
CASES = [
    (1, 128, 1, 1, 64, 64, 3, 4),
    (1, 64, 2, 3, 64, 32, 33, 60),
    (1, 256, 3, 9, 64, 32, 5, 250),
    (2, 128, 2, 4, 128, 32, 0, 128),
    (1, 4096, 2, 3, 64, 32, 17, 4000),  # long enough for the native kernel's chunks across threads
]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("impl", ["native", "reference"])
def test_matches_float64_oracle(impl, case, bits):
    b, n, kvh, r, hd, group, lo, hi = case
    rng = np.random.default_rng(hd * n + bits)
    st = _store(rng, b, n, kvh, hd, bits, group)
    q = (rng.normal(size=(b, kvh, r, hd)) / np.sqrt(hd)).astype(np.float32)
    m, den, acc = kivi_attend(q, **st, lo=lo, hi=hi, bits=bits, group=group, impl=_impl(impl))
    want = _oracle(q, st, lo, hi, bits, group)
    for got, ref in zip((m, den, acc), want, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_empty_range_and_traced_bounds(impl):
    """Under jit with the bounds traced: an empty range gives (float32 min, 0, 0); a clipped one
    reads only the stored positions."""
    rng = np.random.default_rng(1)
    st = _store(rng, 1, 64, 1, 64, 4, 32)
    q = (rng.normal(size=(1, 1, 2, 64)) / 8).astype(np.float32)
    run = jax.jit(lambda lo, hi: kivi_attend(q, **st, lo=lo, hi=hi, bits=4, group=32, impl=_impl(impl)))
    m, den, acc = run(jnp.int32(10), jnp.int32(10))
    assert np.all(np.asarray(m) == np.finfo(np.float32).min) and not np.any(den) and not np.any(acc)
    np.testing.assert_allclose(
        np.asarray(run(jnp.int32(40), jnp.int32(99))[1]), _oracle(q, st, 40, 64, 4, 32)[1], rtol=1e-5
    )


def test_shapes_without_a_native_instance_fall_back():
    """head_dim 16 has no compiled instance: "native" says so, "auto" gives the reference's result."""
    rng = np.random.default_rng(3)
    st = _store(rng, 1, 64, 1, 16, 4, 16)
    q = rng.normal(size=(1, 1, 2, 16)).astype(np.float32)
    _impl("native")
    with pytest.raises(ExceptionGroup) as info:
        kivi_attend(q, **st, lo=0, hi=50, bits=4, group=16, impl="native")
    assert "head_dim in (64, 128)" in str(info.value.exceptions[0])
    got = kivi_attend(q, **st, lo=0, hi=50, bits=4, group=16)
    np.testing.assert_allclose(np.asarray(got[2]), _oracle(q, st, 0, 50, 4, 16)[2], rtol=1e-5, atol=1e-5)


def test_nan_queries_give_nan():
    """A NaN query is not dropped by the max: the result is NaN, as the reference's."""
    rng = np.random.default_rng(4)
    st = _store(rng, 1, 64, 1, 64, 4, 32)
    q = rng.normal(size=(1, 1, 2, 64)).astype(np.float32)
    q[0, 0, 1, 5] = np.nan
    for impl in ("native", "reference"):
        m, den, acc = kivi_attend(q, **st, lo=0, hi=40, bits=4, group=32, impl=_impl(impl))
        assert np.isnan(np.asarray(acc[0, 0, 1])).all() and np.isfinite(np.asarray(acc[0, 0, 0])).all()


def test_bad_arguments_raise():
    rng = np.random.default_rng(2)
    st = _store(rng, 1, 64, 1, 16, 4, 16)
    q = np.zeros((1, 1, 2, 16), np.float32)
    with pytest.raises(ValueError, match="bits must be 2 or 4"):
        kivi_attend(q, **st, lo=0, hi=8, bits=3, group=16)
    with pytest.raises(ValueError, match="key_scale has shape"):
        kivi_attend(q, **dict(st, key_scale=st["key_scale"][:, :1]), lo=0, hi=8, bits=4, group=16)
    with pytest.raises(ValueError, match="group=5 must divide head_dim=16"):
        kivi_attend(q, **st, lo=0, hi=8, bits=4, group=5)
    with pytest.raises(ValueError, match="impl must be one of"):
        kivi_attend(q, **st, lo=0, hi=8, bits=4, group=16, impl="pallas_gpu")


def test_native_builds_are_cached_and_failures_say_why(monkeypatch, tmp_path):
    """A build is keyed and reused; no compiler, VQLIB_NATIVE=off and a source that does not
    compile each give None and the reason (the dispatcher then uses the other backends)."""
    from vqlib.kernels import _native

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    build = _native._build.__wrapped__
    monkeypatch.setenv(_native.ENV, "off")
    assert build(native.SOURCE) == (None, "native kernels are off (environment variable VQLIB_NATIVE=off)")
    monkeypatch.delenv(_native.ENV)
    if _native.compiler() is None:
        pytest.skip("no C++ compiler here")
    bad = tmp_path / "bad.cc"
    bad.write_text("int main( {")
    path, why = build(str(bad))
    assert path is None and "building bad.cc failed" in why
    first, why = build(native.SOURCE)
    assert why == "" and first.startswith(str(tmp_path / "vqlib" / "native"))
    assert build(native.SOURCE) == (first, "")  # the same key: loaded, not rebuilt
    assert [f.name for f in (tmp_path / "vqlib" / "native").iterdir()] == [pathlib.Path(first).name]
    monkeypatch.setattr(_native, "compiler", lambda: None)
    assert build(native.SOURCE)[1].startswith("no C++ compiler found")
