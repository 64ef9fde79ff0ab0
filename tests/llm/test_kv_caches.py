"""Compressed KV caches on tiny random configs: attention through the codes against an independent
float64 attention over the cache's own decoded keys and values, one call against token-by-token
decoding, round-trip errors, the full-precision window and outliers, accounting, bad input."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlib.codebooks import lloyd_max_codebook
from vqlib.kernels import kivi_attend_native_ready
from vqlib.llm import LlamaConfig, Model, attention, forward, generate, init_params, make_cache, perplexity
from vqlib.llm._generate import prefill_chunks
from vqlib.llm._kv_make import KVCalibration, cache_storage, empty_like
from vqlib.llm._kv_rope import RopeTable, rope, unrope
from vqlib.llm._kv_turboquant import channel_scales, fit_turboquant_codec

CFG = LlamaConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, hidden_dim=48)
T = 40  # tokens per test sequence: more than two tiles of 16, a window of 16 and groups of 8


@pytest.fixture(scope="module")
def model():
    return Model(CFG, init_params(jax.random.key(0), CFG))


def _calibration(seed=0, n=1024):
    """Random 'activations' of the same law as the test inputs (keys with a channel offset)."""
    rng = np.random.default_rng(seed)
    shape = (n, CFG.num_kv_heads, CFG.head_dim)
    keys = [(rng.normal(size=shape) + _offset()).astype(np.float32) for _ in range(CFG.num_layers)]
    values = [rng.normal(size=shape).astype(np.float32) for _ in range(CFG.num_layers)]
    weights = [np.abs(rng.normal(size=shape)).astype(np.float32) + 0.1 for _ in range(CFG.num_layers)]
    return KVCalibration(CFG, 64, keys, values, weights, weights)


def _offset():
    """A per-channel key offset: two channels much larger than the rest (outlier channels)."""
    off = np.zeros(CFG.head_dim, np.float32)
    off[[1, 9]] = 6.0
    return off


# method, bits, options: every cache, with and without its window; tile 16 so that 40 tokens span tiles
CASES = {
    "kivi2_window": ("kivi", 2, dict(group=8, window=16, window_dtype="float32")),
    "kivi4": ("kivi", 4, dict(group=8, window=0)),
    "kivi4_sink": ("kivi", 4, dict(group=8, window=0, sink=3)),
    "kivi2_f16window": ("kivi", 2, dict(group=8, window=16)),
    "kvquant3": ("kvquant", 3, dict(outlier_dtype="float32", window_dtype="float32")),
    "kvquant4_nosink": ("kvquant", 4, dict(sink=0)),
    "turboquant3": ("turboquant", 3, {}),
    "turboquant3_sink": ("turboquant", 3, dict(sink=2, window_dtype="float32")),
    "turboquant3.5_rescale": ("turboquant", 3.5, dict(outliers=4, pre_rope=True, center=True, rescale=True)),
    "turboquant3.5": ("turboquant", 3.5, dict(outliers=4)),
    "turboquant3.5_scaled": (
        "turboquant",
        3.5,
        dict(outliers=4, pre_rope=True, center=True, rescale=True, channel_scale=True),
    ),
    "turboquant2.5_prerope": ("turboquant", 2.5, dict(outliers=4, pre_rope=True, center=True)),
    "turboquant3.5_first": ("turboquant", 3.5, dict(outliers=4, pre_rope=True, center=True, first_center=True)),
    "turboquant3_first_post_rope": ("turboquant", 3, dict(center=True, first_center=True)),
    "turboquant3.5_rope_mean": (
        "turboquant",
        3.5,
        dict(outliers=4, center=True, rope_mean=True, rescale=True, channel_scale=True, first_center=True),
    ),
    "turboquant_prod": ("turboquant", 3, dict(prod=True, window=16, window_dtype="float32")),
    "pq2": ("pq", 2, {}),
    "pq3_decoded": ("pq", 3, dict(tables=False, pair_rope=False, window=16)),
}


def _make(model, name, max_len=64, **extra):
    method, bits, options = CASES[name]
    options = dict(options, tile=16, **extra)
    if method in ("kvquant", "pq") or options.get("outliers") or options.get("center"):
        options["calibration"] = _calibration()
    return make_cache(model, method, bits=bits, max_len=max_len, **options)


def _inputs(key, t=T):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (1, t, CFG.num_heads, CFG.head_dim))
    k = jax.random.normal(kk, (1, t, CFG.num_kv_heads, CFG.head_dim)) + jnp.asarray(_offset()).reshape(1, 1, 1, -1)
    v = jax.random.normal(kv, (1, t, CFG.num_kv_heads, CFG.head_dim))
    return q, k, v


@functools.partial(jax.jit, static_argnames="layer")
def _attend_step(cache, q, k, v, layer):
    """One chunk through the cache, compiled once per cache type and chunk length (as decoding is)."""
    out, cache = cache.attend(layer, q, k, v)
    return out, cache.advance(q.shape[1])


def _attend(cache, q, k, v, chunks, layer=0):
    outs, done = [], 0
    for size in chunks:
        part = slice(done, done + size)
        out, cache = _attend_step(cache, q[:, part], k[:, part], v[:, part], layer)
        outs.append(out)
        done += size
    return jnp.concatenate(outs, axis=1), cache


def _full_precision(rule, window, s, p):
    if rule == "block":
        return s >= window * (p // window)
    if rule == "sliding":
        return s >= p - window
    return False


def _reference(cache, q, k, v, layer=0):
    """float64 causal attention where query p reads key/value s as the cache says it holds it:
    decoded from the final store, or the input rounded to the window dtype (window, sink)."""
    kd, vd = (np.asarray(a, np.float64)[0] for a in cache.dequantized(layer, 0, q.shape[1]))
    dtype = np.dtype(cache.window_dtype)
    kf, vf = (np.asarray(np.asarray(a[0]).astype(dtype), np.float64) for a in (k, v))
    q = np.asarray(q[0], np.float64)
    t, h, hd = q.shape
    group = h // k.shape[2]
    out = np.zeros((t, h, hd))
    for p in range(t):
        keys = np.array([kf[s] if s < cache.sink or _full_precision(cache.key_rule, cache.key_window, s, p) else kd[s]
                         for s in range(p + 1)])  # fmt: skip
        vals = np.array([vf[s] if s < cache.sink or _full_precision(cache.value_rule, cache.value_window, s, p)
                         else vd[s] for s in range(p + 1)])  # fmt: skip
        for j in range(h):
            scores = keys[:, j // group] @ q[p, j] / np.sqrt(hd)
            w = np.exp(scores - scores.max())
            out[p, j] = (w / w.sum()) @ vals[:, j // group]
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_through_codes_equals_attention_over_decoded(model, name, key):
    cache = _make(model, name)
    q, k, v = _inputs(key)
    chunks = [23, 1, 16]  # a prefill, one decode step, then a chunk crossing the window and tiles
    out, cache = _attend(cache, q, k, v, chunks)
    assert int(cache.length) == T
    np.testing.assert_allclose(np.asarray(out[0]), _reference(cache, q, k, v), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_call_equals_token_by_token(model, name, key):
    cache = _make(model, name)
    q, k, v = _inputs(key)
    whole, c1 = _attend(cache, q, k, v, [T])
    steps, c2 = _attend(cache, q, k, v, [1] * T)
    np.testing.assert_allclose(np.asarray(whole), np.asarray(steps), atol=2e-6, rtol=1e-5)
    for a, b in zip(c1.dequantized(0, 0, T), c2.dequantized(0, 0, T), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same codes either way


@pytest.mark.parametrize("name", ["kivi2_window", "kvquant3", "turboquant3.5", "pq2"])
def test_decode_after_prefill_equals_longer_prefill(model, name, key):
    tokens = jax.random.randint(key, (1, 30), 0, CFG.vocab_size)
    cache = _make(model, name)
    _, c = forward(model.params, CFG, tokens[:, :29], cache)
    step, _ = forward(model.params, CFG, tokens[:, 29:], c)
    longer, _ = forward(model.params, CFG, tokens, cache)
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(longer[:, -1]), atol=1e-5, rtol=1e-5)


def test_model_through_a_cache_follows_the_float_cache(model, key):
    """3.5- and 4-bit caches on a tiny model: logits within a few percent of the float cache's.
    Bounds from measurements (largest logit error / largest logit, 3 token draws): kivi4 0.029-0.036;
    turboquant at 4 bits 0.043-0.067, at 3 bits 0.10-0.12, at 3.5 bits 0.079."""
    tokens = jax.random.randint(key, (1, 30), 0, CFG.vocab_size)
    ref, _ = forward(model.params, CFG, tokens, make_cache(model, "float", max_len=32))
    for name, bound in [("kivi4", 0.05), ("kvquant4_nosink", 0.05), ("turboquant3.5", 0.12)]:
        logits, _ = forward(model.params, CFG, tokens, _make(model, name))
        err = float(jnp.max(jnp.abs(logits - ref)) / jnp.max(jnp.abs(ref)))
        assert err < bound, (name, err)


# ----------------------------------------------------------------------------- round trips


def test_kivi_round_trip_within_half_a_step(model, key):
    cache = _make(model, "kivi2_window", window=0)
    q, k, v = _inputs(key, 32)
    _, cache = _attend(cache, q, k, v, [32])
    kd, vd = cache.dequantized(0, 0, 32)
    kg = np.asarray(k[0]).reshape(4, 8, 2, 16)  # keys: groups of 8 tokens per channel
    k_step = (kg.max(1) - kg.min(1)) / 3
    assert np.all(np.abs(np.asarray(kd[0]).reshape(4, 8, 2, 16) - kg) <= k_step[:, None] / 2 * 1.01 + 1e-3)
    vg = np.asarray(v[0]).reshape(32, 2, 2, 8)  # values: groups of 8 channels per token
    v_step = (vg.max(-1) - vg.min(-1)) / 3
    assert np.all(np.abs(np.asarray(vd[0]).reshape(32, 2, 2, 8) - vg) <= v_step[..., None] / 2 * 1.01 + 1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_turboquant_round_trip_error_is_the_lloyd_max_distortion(model, bits, key):
    """E||x - x~||^2 / ||x||^2 over 2,000 head vectors = the Lloyd-Max distortion D(hd, b)
    (float16 norms add ~1e-7), within 4 Monte-Carlo standard errors."""
    cache = make_cache(model, "turboquant", bits=bits, max_len=1000, tile=1000)
    x = jax.random.normal(key, (1, 1000, CFG.num_kv_heads, CFG.head_dim))
    cache = cache.attend(0, jnp.zeros((1, 1000, 4, 16)), x, x)[1].advance(1000)
    kd, vd = cache.dequantized(0, 0, 1000)
    rel = np.concatenate([np.sum((np.asarray(a - x)) ** 2, -1) / np.sum(np.asarray(x) ** 2, -1) for a in (kd, vd)])
    want = lloyd_max_codebook(CFG.head_dim, bits)[1]
    assert abs(rel.mean() - want) < 4 * rel.std() / np.sqrt(rel.size), (rel.mean(), want)


@pytest.mark.parametrize("bits", [3, 4])
def test_turboquant_rescale_keeps_the_codes_and_lowers_every_vectors_error(model, bits, key):
    """rescale stores argmin_s ||y - s c|| instead of ||y||: the same codes, each vector's error
    at most the norm's (float16 rounding aside), and the mean error lower (hd = 16, measured:
    0.94 / 0.90 / 0.87 of the norm's at 2 / 3 / 4 bits)."""
    x = jax.random.normal(key, (1, 1000, CFG.num_kv_heads, CFG.head_dim))
    errs, codes = [], []
    for rescale in (False, True):
        cache = make_cache(model, "turboquant", bits=bits, max_len=1000, tile=1000, rescale=rescale)
        cache = cache.attend(0, jnp.zeros((1, 1000, 4, 16)), x, x)[1].advance(1000)
        errs.append(np.sum(np.asarray(cache.dequantized(0, 0, 1000)[0] - x, np.float64) ** 2, -1))
        codes.append(np.asarray(cache.keys[0]["reg"]))
    np.testing.assert_array_equal(codes[0], codes[1])
    assert np.all(errs[1] <= errs[0] * (1 + 1e-3) + 1e-6)
    assert errs[1].mean() < 0.95 * errs[0].mean(), (errs[1].mean(), errs[0].mean())


def test_turboquant_outlier_channels_get_the_extra_bit(model, key):
    """The planted large channels are the outlier part: the key error drops against no outliers."""
    q, k, v = _inputs(key, 64)
    errs = []
    for outliers in (0, 4):
        options = dict(outliers=outliers, key_bits=2, value_bits=2, calibration=_calibration())
        cache = make_cache(model, "turboquant", max_len=64, tile=16, **options)
        _, cache = _attend(cache, q, k, v, [64])
        errs.append(float(jnp.mean((cache.dequantized(0, 0, 64)[0] - k) ** 2)))
    assert errs[1] < 0.6 * errs[0], errs  # measured: 0.27 of it (the offset channels are the outliers)


def test_channel_scales_reach_the_cauchy_schwarz_bound():
    """s^2 = sqrt(F / K) minimises J(s) = (sum K s^2)(sum F / s^2), where J = (sum sqrt(F K))^2;
    every other scale (random perturbations) gives more."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 2, 16)) * np.exp(rng.uniform(-2, 2, (2, 16)))
    fisher = np.abs(rng.normal(size=(500, 2, 16))) * np.exp(rng.uniform(-2, 2, (2, 16)))
    s = channel_scales(x.astype(np.float32), fisher.astype(np.float32)).astype(np.float64)
    k, f = np.mean(x**2, 0), np.mean(fisher, 0)
    J = lambda s: np.sum(k * s**2, -1) * np.sum(f / s**2, -1)  # noqa: E731
    np.testing.assert_allclose(J(s), np.sum(np.sqrt(f * k), -1) ** 2, rtol=1e-4)
    np.testing.assert_allclose(np.mean(np.log(s), -1), 0.0, atol=1e-5)  # geometric mean 1
    for _ in range(20):
        assert np.all(J(s * np.exp(rng.normal(size=s.shape) * 0.1)) > J(s))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_turboquant_channel_scales_cut_the_fisher_weighted_error_as_predicted(bits):
    """Channels of spread variances K and Fisher weights F: the F-weighted round-trip error with
    scales is (sum sqrt(F K))^2 / (sum F sum K) of the unscaled one (the codec's docstring);
    measured 1.05-1.13x that prediction (the rotated coordinates of an anisotropic vector are not
    quite the uniform sphere's), so within [0.9, 1.25] of it."""
    rng = np.random.default_rng(bits)
    n, kvh, hd = 4000, CFG.num_kv_heads, CFG.head_dim
    std = np.exp(rng.uniform(-1.5, 1.5, (kvh, hd)))
    f = np.exp(rng.uniform(-2, 2, (kvh, hd)))
    x = (rng.normal(size=(n, kvh, hd)) * std).astype(np.float32)
    fisher = [np.broadcast_to(f, x.shape).astype(np.float32)] * CFG.num_layers
    errs = []
    for sensitivity in (None, fisher):
        codec = fit_turboquant_codec(jax.random.key(1), CFG, [x] * CFG.num_layers, bits=bits, sensitivity=sensitivity)
        store = codec.write(0, codec.init(1, n, kvh, hd), jnp.asarray(x)[None], jnp.int32(0), None)
        decoded = np.asarray(codec.dequant(0, store, jnp.int32(0), n), np.float64)[0]
        errs.append(np.mean(np.sum((decoded - x) ** 2 * f, -1), 0))
    predicted = np.sum(np.sqrt(f * std**2), -1) ** 2 / (np.sum(f, -1) * np.sum(std**2, -1))
    ratio = errs[1] / errs[0]
    assert np.all(ratio > 0.9 * predicted) and np.all(ratio < 1.25 * predicted), (ratio, predicted)


@pytest.mark.parametrize("sink", [0, 1, 3])
def test_turboquant_statistics_skip_the_positions_the_sink_keeps(model, sink):
    """The calibration's first `sink` positions of each sequence (kept exact by the cache, and
    here planted 1,000x larger) do not enter the fitted means: they equal the float64 means of
    the other positions."""
    cal = _calibration()
    first = np.arange(cal.keys[0].shape[0]) % cal.seq_len < max(sink, 1)
    keys = [np.where(first[:, None, None], 1000.0, k).astype(np.float32) for k in cal.keys]
    cal = dataclasses.replace(cal, keys=keys, values=keys)
    cache = make_cache(model, "turboquant", bits=3.5, max_len=16, outliers=4, center=True, sink=sink, calibration=cal)
    used = np.arange(cal.keys[0].shape[0]) % cal.seq_len >= sink
    for codec in (cache.key_codec, cache.value_codec):
        want = np.mean(np.asarray(keys[0], np.float64)[used], axis=0)
        np.testing.assert_allclose(np.asarray(codec.mean[0]), want, rtol=1e-4, atol=1e-5)


def test_turboquant_first_center_codes_the_sink_on_its_own_mean(model, key):
    """Calibration whose position-0 keys and values are each one large vector (plus 1e-3 noise),
    as an attention sink's are: first_center fits their float64 means as position 0's means and
    keeps them out of the common means; a sequence starting with those vectors then decodes its
    first key and value 100x closer than the common mean lets it (the same 3 bits), and the other
    positions closer too (their mean no longer pulled by position 0)."""
    cal = _calibration()
    first = np.arange(cal.keys[0].shape[0]) % cal.seq_len == 0
    rng = np.random.default_rng(3)
    ck, cv = (30 * rng.normal(size=(CFG.num_kv_heads, CFG.head_dim)).astype(np.float32) for _ in range(2))

    def plant(xs, c):
        return [np.where(first[:, None, None], c + 1e-3 * rng.normal(size=x.shape), x).astype(np.float32) for x in xs]

    cal = dataclasses.replace(cal, keys=plant(cal.keys, ck), values=plant(cal.values, cv))
    caches = [
        make_cache(model, "turboquant", bits=3, max_len=16, center=True, first_center=f, calibration=cal)
        for f in (False, True)
    ]
    for codec, xs in ((caches[1].key_codec, cal.keys), (caches[1].value_codec, cal.values)):
        x64 = np.asarray(xs[0], np.float64)
        np.testing.assert_allclose(codec.mean_first[0], x64[first].mean(0), rtol=1e-5)
        np.testing.assert_allclose(codec.mean[0], x64[~first].mean(0), rtol=1e-4, atol=1e-5)
    q, k, v = _inputs(key, t=16)
    k, v = k.at[0, 0].set(jnp.asarray(ck)), v.at[0, 0].set(jnp.asarray(cv))
    errs = []
    for cache in caches:
        cache = cache.attend(0, q, k, v)[1].advance(16)
        decoded = cache.dequantized(0, 0, 16)
        pairs = zip(decoded, (k, v), strict=True)
        errs.append([np.linalg.norm(np.asarray(d[0] - x[0], np.float64), axis=-1) for d, x in pairs])
    for without, with_first in zip(*errs, strict=True):  # keys, then values: (16, kvh) errors
        assert np.all(with_first[0] < 0.01 * without[0]), (without[0], with_first[0])
        assert np.mean(with_first[1:]) < np.mean(without[1:])


def test_turboquant_rope_mean_centres_each_position_on_the_rotated_mean(model, key):
    """Keys that are one large vector mu before RoPE (plus noise), whatever the position, as this
    model's keys are in many channels: rope_mean fits mu as the float64 mean of the keys before
    RoPE and subtracts RoPE_p(mu) at position p, so every decoded key is >10x closer than with
    one mean of the keys after RoPE (the average of mu's rotations, far from each of them)."""
    kvh, hd, seq_len, n = CFG.num_kv_heads, CFG.head_dim, 64, 1024
    rng = np.random.default_rng(5)
    mu = 20 * rng.normal(size=(kvh, hd))

    def keys_at_positions(count):  # RoPE_p(mu + noise) at p = 0 .. seq_len - 1, window after window
        pre = (mu + 0.3 * rng.normal(size=(count, kvh, hd))).astype(np.float32)
        post = rope(CFG, jnp.asarray(pre.reshape(-1, min(count, seq_len), kvh, hd)), jnp.int32(0))
        return pre, np.asarray(post).reshape(count, kvh, hd)

    pre, post = keys_at_positions(n)
    weights = [np.ones_like(post)] * CFG.num_layers
    cal = KVCalibration(CFG, seq_len, [post] * CFG.num_layers, [post] * CFG.num_layers, weights, weights)
    errs = []
    for rope_mean in (False, True):
        cache = make_cache(model, "turboquant", bits=3, max_len=16, center=True, rope_mean=rope_mean, calibration=cal)
        if rope_mean:
            want = np.asarray(pre, np.float64).mean(0)
            np.testing.assert_allclose(cache.key_codec.mean[0], want, rtol=1e-4, atol=1e-4)
        _, k = keys_at_positions(16)
        q, _, v = _inputs(key, t=16)
        cache = cache.attend(0, q, jnp.asarray(k)[None], v)[1].advance(16)
        decoded = np.asarray(cache.dequantized(0, 0, 16)[0][0], np.float64)
        errs.append(np.linalg.norm(decoded - k, axis=-1))  # (16, kvh)
    assert np.all(errs[1] < 0.1 * errs[0]), errs


def test_pair_channel_scales_are_the_optimum_with_one_scale_per_rope_pair():
    """channel_scales(pairs=True): s_c = s_{c + hd/2}, and the Fisher-weighted error of rotated
    coding, sum_c s_c^2 K_c * sum_c F_c / s_c^2 (module docstring), is the float64 closed-form
    minimum over such scales, (sum_pairs sqrt(F_p K_p))^2, and below every perturbed tied scale."""
    rng = np.random.default_rng(2)
    n, kvh, hd = 4000, 2, 8
    x = rng.normal(size=(n, kvh, hd)) * rng.uniform(0.2, 3.0, size=(kvh, hd))
    f = rng.uniform(0.1, 5.0, size=(kvh, hd)) * np.ones((n, kvh, hd))
    s = channel_scales(x.astype(np.float32), f.astype(np.float32), pairs=True).astype(np.float64)
    np.testing.assert_array_equal(s[:, : hd // 2], s[:, hd // 2 :])
    k, fm = np.mean(x**2, axis=0), f.mean(axis=0)

    def cost(s):
        return np.sum(s**2 * k, -1) * np.sum(fm / s**2, -1)

    kp, fp = k[:, :4] + k[:, 4:], fm[:, :4] + fm[:, 4:]
    np.testing.assert_allclose(cost(s), np.sum(np.sqrt(fp * kp), -1) ** 2, rtol=1e-5)
    for _ in range(20):
        tied = np.tile(np.exp(0.2 * rng.normal(size=(kvh, 4))), 2)
        assert np.all(cost(s) <= cost(s * tied) * (1 + 1e-9))


def test_pq_codebook_rows_round_trip_exactly(model):
    cache = _make(model, "pq2")
    centroids = np.asarray(cache.value_codec.centroids[0], np.float32)  # (kvh, m, k, dsub), identity order
    rng = np.random.default_rng(0)
    picks = rng.integers(0, centroids.shape[2], size=(10, CFG.num_kv_heads, centroids.shape[1]))
    rows = np.take_along_axis(centroids[None], picks[..., None, None], axis=3)[..., 0, :]  # (10, kvh, m, dsub)
    v = jnp.asarray(rows.reshape(1, 10, CFG.num_kv_heads, CFG.head_dim))
    _, cache = _attend(cache, jnp.zeros((1, 10, 4, 16)), v, v, [10])
    np.testing.assert_array_equal(np.asarray(cache.dequantized(0, 0, 10)[1]), np.asarray(v))


def test_kvquant_outliers_restored_exactly(model, key):
    """Numbers planted far outside every calibration range come back exactly (as stored: float32
    exactly, float16 rounded once); keys are compared before RoPE, where they are coded."""
    q, k, v = _inputs(key, 8)
    k = k.at[0, 3, 1, 5].set(40.0).at[0, 6, 0, 2].set(-55.5)
    v = v.at[0, 2, 0, 7].set(123.25)
    k_pre = np.asarray(unrope(CFG, k, jnp.int32(0)))
    for dtype in ("float32", "float16"):
        cache = _make(model, "kvquant3", outlier_dtype=dtype)
        _, cache = _attend(cache, q, k, v, [8])
        pre = np.asarray(cache.key_codec.dequant_pre_rope(0, cache.keys[0], jnp.int32(0), 8))
        for idx in [(0, 3, 1, 5), (0, 6, 0, 2)]:
            assert pre[idx] == k_pre[idx].astype(dtype), (dtype, idx)
        vd = np.asarray(cache.dequantized(0, 0, 8)[1])
        assert vd[0, 2, 0, 7] == np.float32(123.25).astype(dtype)


def test_full_precision_window_is_exact(model, key):
    """KIVI's window in float32: the last tokens' keys and values are kept bit-exactly, and the
    newest query, whose window holds every token, reads them all exactly."""
    q, k, v = _inputs(key, 16)
    cache = _make(model, "kivi2_window")
    out, cache = _attend(cache, q, k, v, [16])
    np.testing.assert_array_equal(np.asarray(cache.recent_keys[0]), np.asarray(k))
    np.testing.assert_array_equal(np.asarray(cache.recent_values[0]), np.asarray(v))
    pos = jnp.arange(16, dtype=jnp.int32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(attention(q, k, v, pos, pos)), atol=1e-6)


# ----------------------------------------------------------------------------- accounting


def test_bits_per_element(model):
    """Effective bits per element at a long context, side data counted: the presets' sums."""
    ctx = 10**9  # codebooks, window and sink amortised to nothing: the per-token bits alone
    bits = {name: cache_storage(_make(model, name), ctx)["bits_per_element"] for name in CASES}
    assert bits["kivi2_window"] == pytest.approx(2 + 32 / 8)  # + float16 scale and zero per group of 8
    assert bits["kivi4"] == pytest.approx(4 + 32 / 8)
    assert bits["turboquant3"] == pytest.approx(3 + 16 / 16)  # one float16 norm per 16-dim head
    assert bits["turboquant3.5"] == pytest.approx(((4 * 4 + 12 * 3 + 32) + (16 * 3 + 16)) / 32)
    assert bits["pq2"] == pytest.approx(2.0)
    n_out = 1  # max(1, round(1% of 2 heads x 16))
    key_bits = 3 + n_out * (32 + 8) / 32
    value_bits = 3 + 32 / 16 + n_out * (32 + 8) / 32
    assert bits["kvquant3"] == pytest.approx((key_bits + value_bits) / 2)


def test_storage_counts_window_and_codebooks(model):
    cache = _make(model, "kivi2_window", window_dtype="float16")
    s = cache_storage(cache, 64)
    assert s["window"] == pytest.approx(2 * 16 * 2 * 2 * 16 / 64)  # keys and values, 16 tokens, float16
    pq = _make(model, "pq2")
    k = pq.key_codec.centroids[0].shape[2]
    assert cache_storage(pq, 64)["codebooks"] == pytest.approx(2 * 2 * 8 * k * 2 * 2 / 64)
    fl = make_cache(model, "float", bits=16, max_len=8)
    assert cache_storage(fl)["float16_fraction"] == 1.0
    assert cache_storage(fl)["bytes_per_token"] == 2 * 2 * 16 * 2


# ----------------------------------------------------------------------------- through the model


def test_perplexity_one_pass_equals_token_by_token(model, key):
    ids = np.asarray(jax.random.randint(key, (64,), 0, CFG.vocab_size))
    for name in ["kivi2_window", "turboquant3.5", "kvquant3"]:
        cache = _make(model, name, max_len=32)
        one = perplexity(model, ids, kv_cache=cache, ctx=32)
        steps = perplexity(model, ids, kv_cache=cache, ctx=32, token_by_token=True)
        assert one == pytest.approx(steps, rel=1e-5), name


def test_generate_greedy_and_sampled(model, key):
    prompt = np.asarray(jax.random.randint(key, (7,), 0, CFG.vocab_size))
    float_ids = generate(model, prompt, 5)
    again = generate(model, prompt, 5, kv_cache=make_cache(model, "float", max_len=12))
    np.testing.assert_array_equal(np.asarray(float_ids), np.asarray(again))
    kivi = generate(model, prompt, 5, kv_cache=_make(model, "kivi4", max_len=12))
    assert kivi.shape == (1, 5)
    a = generate(model, prompt, 5, temperature=1.0, key=jax.random.key(1))
    b = generate(model, prompt, 5, temperature=1.0, key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # reproducible per key


def test_prefill_chunks_are_powers_of_two():
    assert prefill_chunks(0) == []
    assert prefill_chunks(1029) == [512, 512, 4, 1]
    assert all(sum(prefill_chunks(n, 8)) == n for n in range(40))


def test_decode_steps_compile_once(model, key):
    cache = _make(model, "turboquant3")
    tokens = jax.random.randint(key, (1, 20), 0, CFG.vocab_size)
    _, cache = forward(model.params, CFG, tokens[:, :10], cache)
    _, cache = forward(model.params, CFG, tokens[:, 10:11], cache)
    compiled = forward._cache_size()
    for i in range(11, 20):  # lengths 11..19 span two tiles: one compiled step serves all
        _, cache = forward(model.params, CFG, tokens[:, i : i + 1], cache)
    assert forward._cache_size() == compiled


def test_empty_like_keeps_the_fitted_codebooks(model):
    cache = _make(model, "pq2")
    bigger = empty_like(cache, max_len=200)
    assert bigger.max_len == 200 and bigger.key_codec is cache.key_codec
    assert empty_like(make_cache(model, "float", max_len=4), max_len=9).max_len == 9


def test_rope_table_rotates_as_the_formula_at_far_positions():
    cfg = dataclasses.replace(CFG, head_dim=64, rope_theta=100_000.0)
    x = jax.random.normal(jax.random.key(3), (2, 512, 3, 64), jnp.float32)
    table = RopeTable.build(cfg, 8704)
    for start in (0, 1, 7_000, 8_192):
        got = np.asarray(table.rope(x, jnp.int32(start)))
        np.testing.assert_allclose(got, np.asarray(rope(cfg, x, jnp.int32(start))), rtol=0, atol=2e-6)
        back = np.asarray(table.unrope(jnp.asarray(got), jnp.int32(start)))
        np.testing.assert_allclose(back, np.asarray(x), rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="cannot rotate 9000"):
        table.rope(jnp.zeros((1, 9000, 1, 64)), jnp.int32(0))


@pytest.mark.parametrize("name", ["kvquant3", "turboquant3.5_scaled", "turboquant3.5_rope_mean"])
def test_pre_rope_codecs_carry_a_table_as_long_as_the_stores(model, name):
    cache = _make(model, name)
    positions = lambda c: jax.tree.leaves(c.keys[0])[0].shape[1]  # noqa: E731
    assert cache.key_codec.rope_table.capacity == positions(cache)
    assert getattr(cache.value_codec, "rope_table", None) is None  # values are not rotated
    bigger = empty_like(cache, max_len=300)
    assert bigger.key_codec.rope_table.capacity == positions(bigger) > positions(cache)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "method,bits,options,match",
    [
        ("kivi", 3, {}, "kivi supports bits"),
        ("kvquant", 2, {}, "kvquant supports bits"),
        ("turboquant", 5, {}, "turboquant supports bits"),
        ("float", 8, {}, "float cache stores"),
        ("kivi", 2, dict(group=32), "head_dim=16 is not divisible by group=32"),
        ("kivi", 2, dict(group=8, window=12), "window=12 is not a multiple of group=8"),
        ("turboquant", 3, dict(outliers=15, calibration=None), "each rotated part needs at least 2 channels"),
        ("turboquant", 3, dict(channel_scale=True, calibration=None), "pass pre_rope=True or rope_mean=True"),
        ("turboquant", 3, dict(rope_mean=True), "pass center=True and pre_rope=False"),
        ("turboquant", 3, dict(rope_mean=True, center=True, pre_rope=True), "pass center=True and pre_rope=False"),
        ("turboquant", 3, dict(rope_mean=True, center=True, outliers=3), "pass an even outliers"),
        ("turboquant", 3, dict(first_center=True), "pass center=True"),
        ("turboquant", 3, dict(first_center=True, center=True, sink=1), "use one or the other"),
        ("pq", 2, dict(m=5), "head_dim=16 is not divisible by m=5"),
        ("kivi", 4, dict(group=8, sink=17), "sink=17 keeps more positions in full precision than max_len=16"),
        ("nope", 2, {}, "unknown KV cache method"),
    ],
)
def test_bad_settings_raise(model, method, bits, options, match):
    if options.get("calibration", 0) is None:
        options = dict(options, calibration=_calibration())
    with pytest.raises(ValueError, match=match):
        make_cache(model, method, bits=bits, max_len=16, **options)


def test_a_flag_given_as_text_is_refused(model):
    with pytest.raises(TypeError, match="pre_rope must be True or False"):
        make_cache(model, "turboquant", bits=3, max_len=16, pre_rope="False")  # bool("False") is True


def test_unknown_option_raises(model):
    with pytest.raises(TypeError, match="unknown option"):
        make_cache(model, "kivi", bits=2, max_len=16, group=8, windw=16)


def test_decoding_past_max_len(model, key):
    prompt = np.asarray(jax.random.randint(key, (6,), 0, CFG.vocab_size))
    cache = _make(model, "kivi4", max_len=8)
    with pytest.raises(ValueError, match="exceed the cache's max_len=8"):
        generate(model, prompt, 5, kv_cache=cache)
    with pytest.raises(ValueError, match="exceed the cache's max_len=8"):
        perplexity(model, np.arange(40) % 64, kv_cache=cache, ctx=20)
    # a forward call past the end cannot raise under jit: it returns NaN, never silently wrong numbers
    logits, cache = forward(model.params, CFG, jnp.asarray(prompt[None]), cache)
    assert np.isfinite(np.asarray(logits)).all()
    logits, _ = forward(model.params, CFG, jnp.zeros((1, 3), jnp.int32), cache)
    assert np.isnan(np.asarray(logits)).all()


def test_cache_for_another_model_raises(model, key):
    other_cfg = dataclasses.replace(CFG, num_kv_heads=1)
    other = Model(other_cfg, init_params(key, other_cfg))
    cache = make_cache(other, "kivi", bits=4, max_len=32, group=8, window=0)
    with pytest.raises(ValueError, match="built for (another model|a model with)"):
        generate(model, [1, 2, 3], 2, kv_cache=cache)
    with pytest.raises(ValueError, match="built for (another model|a model with)"):
        perplexity(model, np.arange(64) % 64, kv_cache=cache, ctx=32)
    with pytest.raises(ValueError, match="built for (another model|a model with)"):
        forward(model.params, CFG, jnp.zeros((1, 3), jnp.int32), cache)
    same_shape = dataclasses.replace(CFG, rope_theta=500.0)
    twin = make_cache(Model(same_shape, model.params), "turboquant", bits=3, max_len=32)
    with pytest.raises(ValueError, match="built for (another model|a model with)"):
        generate(model, [1, 2, 3], 2, kv_cache=twin)
    with pytest.raises(ValueError, match="already holds 3 tokens"):
        full = forward(model.params, CFG, jnp.zeros((1, 3), jnp.int32), _make(model, "kivi4"))[1]
        generate(model, [1, 2, 3], 2, kv_cache=full)


def test_pq_tables_do_not_blow_up_a_long_chunk(model, key):
    """Scoring by tables gathers (m, g t, tile) numbers per head: for a prefill chunk of many
    queries the cache decodes key tiles instead, so a chunk's compiled temporaries equal the
    decoded path's, not m times them (the pq-4 benchmark row ran out of memory that way)."""
    q, k, v = _inputs(key, 64)
    temps = []
    for tables in (True, False):
        cache = make_cache(model, "pq", bits=2, max_len=64, tile=64, tables=tables, calibration=_calibration())
        compiled = _attend_step.lower(cache, q, k, v, 0).compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
    assert temps[0] <= 1.2 * temps[1], temps


CFG64 = LlamaConfig(vocab_size=64, dim=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64, hidden_dim=64)


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_native_read_equals_attention_over_decoded_and_the_tile_loop(bits, key):
    """At a head_dim the C++ kernel is compiled for, a decode step reads the codes older than the
    window through it: the same float64 reference and the same result as the XLA tile loop."""
    if not kivi_attend_native_ready(64, 32):
        pytest.skip("the native KIVI kernel is not available here (no C++ compiler or not a CPU)")
    model64 = Model(CFG64, init_params(jax.random.key(0), CFG64))
    kq, kk, kv = jax.random.split(key, 3)
    t = 150
    q = jax.random.normal(kq, (1, t, 4, 64))
    k = jax.random.normal(kk, (1, t, 2, 64)) + 3.0 * (jnp.arange(64) % 7 == 0).astype(jnp.float32).reshape(1, 1, 1, 64)
    v = jax.random.normal(kv, (1, t, 2, 64))
    outs = {}
    for read in ("auto", "tiles"):
        cache = make_cache(model64, "kivi", bits=bits, max_len=160, window=32, read=read, tile=64)
        outs[read], cache = _attend(cache, q, k, v, [100, 1, 1, 48])
    np.testing.assert_allclose(np.asarray(outs["auto"][0]), _reference(cache, q, k, v), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(outs["auto"]), np.asarray(outs["tiles"]), atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="read must be one of"):
        make_cache(model64, "kivi", bits=bits, max_len=160, read="fast")
