"""`make_cache(model, method, bits=..., max_len=...)`: an empty KV cache of any method, and its accounting.

    "float"       keys and values as they are (float32, or float16 with bits=16)
    "kivi"        uniform 2/4-bit codes, keys per channel over 32-token groups, values per token;
                  the last 128 tokens in full precision
    "kvquant"     3/4 bits; keys before RoPE with per-channel levels, values per token with
                  per-layer levels (levels by sensitivity-weighted k-means on calibration); ~1%
                  outliers and the first token kept exactly
    "turboquant"  random rotation per head + Lloyd-Max levels, norms stored; key outlier
                  channels at one more bit (chosen on calibration); 2.5 / 3.5 bits presets
    "pq"          per-head product quantisation fitted on calibration, keys scored by tables

Every compressed cache is a `CompressedKVCache` (`_kv_engine`); `cache_storage(cache)` reports
bytes per token per layer and effective bits per element for any cache, the float one included.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vqlib import _checks
from vqlib.llm._config import LlamaConfig
from vqlib.llm._kv_cache import FloatKVCache, float_buffers, init_float_cache
from vqlib.llm._kv_calibrate import calibration_tokens, collect_kv, kv_sensitivity, pre_rope_keys
from vqlib.llm._kv_engine import CompressedKVCache, empty_cache
from vqlib.llm._kv_kivi import kivi_codecs
from vqlib.llm._kv_kvquant import BITS as KVQUANT_BITS
from vqlib.llm._kv_kvquant import fit_kvquant_codecs
from vqlib.llm._kv_pq import fit_pq_codec, pq_shape, rope_pair_order
from vqlib.llm._kv_turboquant import fit_turboquant_codec
from vqlib.llm._model import Model

METHODS = ("float", "kivi", "kvquant", "turboquant", "pq")
TURBOQUANT_BITS = (2, 2.5, 3, 3.5, 4)
WINDOW_DTYPES = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class KVCalibration:
    """Calibration activations of one model, reusable across `make_cache` calls.

    Attributes:
        config: the model's config.
        seq_len: tokens per calibration sequence.
        keys, values: per layer, (n, kvh, hd) float32 numpy post-RoPE keys and values.
        key_weights, value_weights: per layer, squared loss gradients of the keys before RoPE
            and of the values (None when not computed).
    """

    config: LlamaConfig
    seq_len: int
    keys: list
    values: list
    key_weights: list | None = None
    value_weights: list | None = None

    def keys_before_rope(self) -> list:
        return [pre_rope_keys(self.config, k, self.seq_len) for k in self.keys]


def skip_first(per_layer: list | None, seq_len: int, n: int) -> list | None:
    """Per-layer calibration arrays (num_sequences * seq_len, ...) without the first n positions
    of each sequence: the positions a cache's sink keeps in full precision, whose keys (the
    attention sink's, often far larger than the rest) would otherwise set the codecs' statistics."""
    if per_layer is None or n == 0:
        return per_layer
    keep = np.arange(per_layer[0].shape[0]) % seq_len >= n
    return [a[keep] for a in per_layer]


def first_positions(per_layer: list, seq_len: int) -> list:
    """Per-layer calibration arrays (num_sequences * seq_len, ...) at position 0 of each sequence."""
    return [a[np.arange(a.shape[0]) % seq_len == 0] for a in per_layer]


def calibrate(
    model: Model, calibration=None, *, num_sequences: int = 8, seq_len: int = 512, sensitivity: bool = False
) -> KVCalibration:
    """Runs the model on calibration windows and keeps their keys and values (and, with
    `sensitivity`, the squared gradients KVQuant weights its k-means by).

    Args:
        model: the Model the caches will serve.
        calibration: text or token ids; None reads WikiText-2's validation text from the shared
            data folder (never the test split).
        num_sequences: calibration windows.
        seq_len: tokens per window.
        sensitivity: also compute the squared gradients (a backward pass per window).

    Returns:
        KVCalibration.
    """
    num_sequences = _checks.check_int(num_sequences, "num_sequences", low=1)
    seq_len = _checks.check_int(seq_len, "seq_len", low=2)
    tokens = calibration_tokens(model, calibration, num_sequences=num_sequences, seq_len=seq_len)
    keys, values = collect_kv(model, tokens)
    kw = vw = None
    if sensitivity:
        kw, vw = kv_sensitivity(model, tokens)
    return KVCalibration(model.config, seq_len, keys, values, kw, vw)


def _calibration(model, calibration, options, *, sensitivity: bool, num_sequences: int = 8) -> KVCalibration:
    kwargs = {name: options.pop(name) for name in ("num_sequences", "seq_len") if name in options}
    if isinstance(calibration, KVCalibration):
        if kwargs:
            raise TypeError(f"{sorted(kwargs)} set how calibrate() runs; calibration is already a calibrate() result")
        if calibration.config != model.config:
            raise ValueError("calibration was collected on another model (its config differs); calibrate this model")
        if sensitivity and calibration.key_weights is None:
            raise ValueError("this method weights k-means by sensitivity: calibrate(..., sensitivity=True)")
        return calibration
    kwargs.setdefault("num_sequences", num_sequences)
    return calibrate(model, calibration, sensitivity=sensitivity, **kwargs)


def _pop_window(options, default: int, group: int = 1) -> tuple[int, dict]:
    window = _checks.check_int(options.pop("window", default), "window", low=0)
    window_dtype = options.pop("window_dtype", "float16")
    if window_dtype not in WINDOW_DTYPES:
        raise ValueError(f"window_dtype must be one of {WINDOW_DTYPES}, got {window_dtype!r}")
    settings = dict(window_dtype=window_dtype)
    if window:
        settings |= dict(key_rule="block", key_window=window, value_rule="block", value_window=window)
    return window, settings


def make_cache(
    model: Model,
    method: str,
    *,
    bits=None,
    max_len: int,
    batch: int = 1,
    calibration=None,
    key=None,
    **options,
):
    """An empty KV cache for `model` that stores keys and values compressed as they arrive.

    Args:
        model: the Model it will serve (its config is checked at every use).
        method: "float", "kivi", "kvquant", "turboquant" or "pq" (see the module table).
        bits: "float": 32 (default) or 16; "kivi": 2 or 4; "kvquant": 3 or 4; "turboquant": 2,
            2.5, 3, 3.5 or 4 (bits per element, norms counted, averaged over keys and values);
            "pq": bits per element of the codes (k = 2**(bits * dsub) centroids per sub-space).
        max_len: capacity in tokens (prompt and generated tokens together).
        batch: sequences decoded together.
        calibration: for the fitted methods, text, token ids or a `calibrate(...)` result;
            None reads WikiText-2's validation text.
        key: PRNG key (rotations, k-means seeds); default jax.random.key(0).
        **options: per method, all optional:
            every compressed cache: tile (positions per attention tile, default 512), read
                ("auto": a native kernel reads the codes where the cache has one on this
                device, KIVI on a CPU; "tiles": always XLA's tile loop),
                window_dtype ("float16" or "float32": how full-precision tokens are stored),
                sink (the first positions kept in full precision, "attention sinks": 1 for
                kvquant, 0 for the others);
            kivi: group (32), window (128);
            kvquant: outliers (fraction kept exactly, 0.01), sensitivity (True),
                outlier_dtype ("float16"), num_sequences (8), seq_len (512);
            turboquant: outliers (key channels at one more bit; 16 for 2.5 and 3.5 at hd=64,
                hd/4 in general, else 0), key_bits / value_bits (override the preset),
                value_outliers (0), pre_rope (False), center (False), prod (False: keys as
                TurboQuant-prod), rescale (False: store least-squares scales, not norms; values
                only with prod), channel_scale (False: per-channel scales before the rotation
                from the loss's gradients, s = (F / K)^(1/4); needs pre_rope or rope_mean),
                first_center (False: position 0's keys and values centred on their own
                calibration mean, coded like the rest; needs center, excludes sink), rope_mean
                (False: keys coded after RoPE, centred on the pre-RoPE mean rotated to each
                position: pre_rope's statistics, read in the rotated domain without decoding
                each key; needs center, excludes pre_rope), window (0), num_sequences, seq_len;
            pq: m (sub-spaces per head, hd/2), k (centroids, 2**(bits hd / m)), pair_rope (True:
                keys' RoPE planes share a sub-space), tables (True), window (0), max_iter (25),
                num_sequences (16), seq_len (512).

    Returns:
        A cache for `perplexity(..., kv_cache=)`, `generate(..., kv_cache=)` or `forward`.

    Example:
        >>> import jax
        >>> from vqlib.llm import LlamaConfig, Model, init_params
        >>> from vqlib.llm._kv_make import make_cache, cache_storage
        >>> cfg = LlamaConfig(vocab_size=64, dim=32, num_layers=1, num_heads=2, num_kv_heads=1,
        ...                   head_dim=32, hidden_dim=64)
        >>> model = Model(cfg, init_params(jax.random.key(0), cfg))
        >>> cache = make_cache(model, "kivi", bits=2, max_len=256, window=32)
        >>> round(cache_storage(cache, 256)["bits_per_element"], 2)       # 2 + 1 (scales) + window
        5.0
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be a vqlib.llm.Model (from vqlib.llm.load), got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown KV cache method {method!r}; choose one of {list(METHODS)}")
    config = model.config
    max_len = _checks.check_int(max_len, "max_len", low=1)
    batch = _checks.check_int(batch, "batch", low=1)
    key = jax.random.key(0) if key is None else key
    options = dict(options)
    if method == "float":
        bits = 32 if bits is None else bits
        if bits not in (16, 32):
            raise ValueError(f"the float cache stores bits=32 (float32) or bits=16 (float16), got bits={bits!r}")
        _no_more(options, method)
        return init_float_cache(config, batch, max_len, jnp.float32 if bits == 32 else jnp.float16)
    tile = _checks.check_int(options.pop("tile", 512), "tile", low=1)
    sink = _checks.check_int(options.pop("sink", 1 if method == "kvquant" else 0), "sink", low=0)
    if sink > max_len:
        raise ValueError(f"sink={sink} keeps more positions in full precision than max_len={max_len} holds")
    read = options.pop("read", "auto")
    common = dict(batch=batch, max_len=max_len, method=method, tile=tile, sink=sink, read=read)

    if method == "kivi":
        if bits is None:
            raise ValueError("kivi needs bits=2 or bits=4")
        group = _checks.check_int(options.pop("group", 32), "group", low=1)
        window, settings = _pop_window(options, 128)
        kc, vc, rules = kivi_codecs(config, bits, group, window)
        settings |= rules
        _no_more(options, method)
        desc = (("bits", bits), ("group", group), ("window", window), ("sink", sink))
        return empty_cache(kc, vc, config, **common, **settings, description=desc)

    if method == "kvquant":
        if bits not in KVQUANT_BITS:
            raise ValueError(f"kvquant supports bits in {KVQUANT_BITS}, got bits={bits!r}")
        fraction = float(options.pop("outliers", 0.01))
        if not 0 <= fraction < 0.5:
            raise ValueError(f"outliers is the fraction of numbers kept exactly, in [0, 0.5), got {fraction}")
        sensitivity = _checks.check_bool(options.pop("sensitivity", True), "sensitivity")
        outlier_dtype = options.pop("outlier_dtype", "float16")
        if outlier_dtype not in WINDOW_DTYPES:
            raise ValueError(f"outlier_dtype must be one of {WINDOW_DTYPES}, got {outlier_dtype!r}")
        window, settings = _pop_window(options, 0)
        cal = _calibration(model, calibration, options, sensitivity=sensitivity)
        _no_more(options, method)
        n_out = max(1, round(fraction * config.num_kv_heads * config.head_dim)) if fraction > 0 else 0
        if n_out == 0:
            raise ValueError("kvquant keeps outliers exactly: pass outliers > 0 (e.g. 0.01)")
        ones = [np.ones_like(k) for k in cal.keys]
        kw = cal.key_weights if sensitivity else ones
        vw = cal.value_weights if sensitivity else ones
        kc, vc = fit_kvquant_codecs(
            key, config, cal.keys_before_rope(), cal.values, kw, vw,
            bits=bits, num_outliers=n_out, outlier_dtype=outlier_dtype,
        )  # fmt: skip
        desc = (("bits", bits), ("outliers", n_out), ("sink", sink), ("sensitivity", sensitivity), ("window", window))
        return empty_cache(kc, vc, config, **common, **settings, description=desc)

    if method == "turboquant":
        return _turboquant(model, bits, calibration, key, options, common)
    return _pq(model, bits, calibration, key, options, common)


def _turboquant(model, bits, calibration, key, options, common):
    config = model.config
    hd = config.head_dim
    if bits not in TURBOQUANT_BITS and not {"key_bits", "value_bits"} <= set(options):
        raise ValueError(
            f"turboquant supports bits in {TURBOQUANT_BITS} (per element, norms counted), got bits={bits!r}; "
            "or pass key_bits= and value_bits= (bits per coordinate) yourself"
        )
    base = int(bits) if bits is not None else None
    fractional = bits is not None and bits != int(bits)
    key_bits = _checks.check_int(options.pop("key_bits", base), "key_bits", low=1, high=6)
    value_bits = _checks.check_int(options.pop("value_bits", base), "value_bits", low=1, high=6)
    default_out = hd // 4 if fractional else 0
    outliers = _checks.check_int(options.pop("outliers", default_out), "outliers", low=0)
    value_outliers = _checks.check_int(options.pop("value_outliers", 0), "value_outliers", low=0)
    flag = lambda name: _checks.check_bool(options.pop(name, False), name)  # noqa: E731
    pre_rope, center, prod, rescale = flag("pre_rope"), flag("center"), flag("prod"), flag("rescale")
    channel_scale, first_center, rope_mean = flag("channel_scale"), flag("first_center"), flag("rope_mean")
    if first_center and not center:
        raise ValueError("first_center centres position 0 on its own calibration mean: pass center=True")
    if first_center and common["sink"]:
        raise ValueError("first_center codes position 0, which sink keeps in full precision: use one or the other")
    if channel_scale and not (pre_rope or rope_mean):
        raise ValueError(
            "channel_scale fits key scales on the loss's gradients of the keys before RoPE: pass pre_rope=True "
            "or rope_mean=True with it"
        )
    if prod and key_bits < 2:
        raise ValueError("prod spends one bit on the residual sketch: pass key_bits >= 2")
    if rope_mean and (pre_rope or not center):
        raise ValueError(
            "rope_mean codes keys after RoPE centred on their rotated pre-RoPE mean: "
            "pass center=True and pre_rope=False"
        )
    if rope_mean and outliers % 2:
        raise ValueError(f"rope_mean picks key outlier channels in RoPE pairs: pass an even outliers, got {outliers}")
    window, settings = _pop_window(options, 0)
    needs_data = outliers or value_outliers or center or channel_scale
    cal = _calibration(model, calibration, options, sensitivity=channel_scale) if needs_data else None
    _no_more(options, "turboquant")
    k_rot, v_rot = jax.random.split(key)
    ks = vs = kw = vw = k_first = v_first = None
    if cal is not None:
        ks = cal.keys_before_rope() if (pre_rope or rope_mean) else cal.keys
        vs = cal.values
        if channel_scale:
            kw, vw = cal.key_weights, cal.value_weights
        if first_center:
            k_first, v_first = first_positions(ks, cal.seq_len), first_positions(vs, cal.seq_len)
        # statistics of the positions the codecs code (not the sink's), and not position 0's
        # when it gets its own mean
        skip = max(common["sink"], int(first_center))
        ks, vs, kw, vw = (skip_first(a, cal.seq_len, skip) for a in (ks, vs, kw, vw))
    kc = fit_turboquant_codec(
        k_rot, config, ks, bits=key_bits, outliers=outliers, pre_rope=pre_rope, center=center, prod=prod,
        rescale=rescale and not prod, sensitivity=kw, first_samples=k_first, rope_mean=rope_mean,
    )  # fmt: skip
    vc = fit_turboquant_codec(
        v_rot, config, vs, bits=value_bits, outliers=value_outliers, center=center, rescale=rescale, sensitivity=vw,
        first_samples=v_first,
    )  # fmt: skip
    desc = (("bits", bits), ("key_bits", key_bits), ("value_bits", value_bits), ("outliers", kc.outliers))
    desc += (("pre_rope", pre_rope), ("center", center), ("prod", prod), ("window", window))
    desc += (("rescale", rescale), ("channel_scale", channel_scale), ("sink", common["sink"]))
    desc += (("first_center", first_center), ("rope_mean", rope_mean))
    return empty_cache(kc, vc, config, **common, **settings, description=desc)


def _pq(model, bits, calibration, key, options, common):
    config = model.config
    hd = config.head_dim
    if bits is None and "k" not in options:
        raise ValueError("pq needs bits= (bits per element of the codes) or k= (centroids per sub-space)")
    m, k = pq_shape(hd, bits or 1, options.pop("m", None), options.pop("k", None))
    pair_rope = _checks.check_bool(options.pop("pair_rope", True), "pair_rope")
    tables = _checks.check_bool(options.pop("tables", True), "tables")
    max_iter = _checks.check_int(options.pop("max_iter", 25), "max_iter", low=1)
    window, settings = _pop_window(options, 0)
    cal = _calibration(model, calibration, options, sensitivity=False, num_sequences=16)
    _no_more(options, "pq")
    k_key, v_key = jax.random.split(key)
    key_order = rope_pair_order(hd) if pair_rope else tuple(range(hd))
    kc = fit_pq_codec(k_key, cal.keys, m=m, k=k, order=key_order, max_iter=max_iter)
    kc = dataclasses.replace(kc, tables=tables)
    vc = fit_pq_codec(v_key, cal.values, m=m, k=k, order=tuple(range(hd)), max_iter=max_iter)
    desc = (("bits", bits), ("m", m), ("k", k), ("pair_rope", pair_rope), ("window", window))
    desc += (("sink", common["sink"]),)
    return empty_cache(kc, vc, config, **common, **settings, description=desc)


def _no_more(options: dict, method: str) -> None:
    if options:
        raise TypeError(f"unknown option(s) {sorted(options)} for method {method!r}; see make_cache's docstring")


def empty_like(cache, *, max_len: int | None = None, batch: int | None = None):
    """An empty cache with the same method, settings and fitted codebooks (another capacity or batch)."""
    if isinstance(cache, FloatKVCache):
        b, _, kvh, hd = cache.keys[0].shape
        return float_buffers(len(cache.keys), batch or b, max_len or cache.max_len, kvh, hd, cache.keys[0].dtype)
    if not isinstance(cache, CompressedKVCache):
        raise TypeError(f"expected a cache from make_cache, got {type(cache).__name__}")
    return empty_cache(
        cache.key_codec, cache.value_codec, cache.config,
        batch=batch or cache.length_batch, max_len=max_len or cache.max_len, method=cache.method,
        key_rule=cache.key_rule, key_window=cache.key_window, value_rule=cache.value_rule,
        value_window=cache.value_window, sink=cache.sink, tile=cache.tile, read=cache.read,
        window_dtype=cache.window_dtype,
        description=cache.description,
    )  # fmt: skip


def cache_storage(cache, context: int | None = None) -> dict:
    """Bytes per token per layer, effective bits per element and the fraction of a float16
    cache, for any cache (the float one: its dtype's bytes), at `context` stored tokens."""
    if isinstance(cache, FloatKVCache):
        _, _, kvh, hd = cache.keys[0].shape
        per_token = 2 * kvh * hd * cache.keys[0].dtype.itemsize
        return dict(
            codes=per_token, codebooks=0.0, window=0.0, sink=0.0, bytes_per_token=float(per_token),
            bits_per_element=8.0 * cache.keys[0].dtype.itemsize, float16_fraction=per_token / (4 * kvh * hd),
            context=context or cache.max_len,
        )  # fmt: skip
    if not isinstance(cache, CompressedKVCache):
        raise TypeError(f"expected a cache from make_cache, got {type(cache).__name__}")
    return cache.storage(context)


def cache_batch(cache) -> int:
    """Sequences the cache holds."""
    return cache.keys[0].shape[0] if isinstance(cache, FloatKVCache) else cache.length_batch


def check_cache_for(cache, model: Model, num_tokens: int) -> None:
    """ValueError unless `cache` is empty, was built for `model`'s config and holds num_tokens."""
    if isinstance(cache, FloatKVCache):
        _, _, kvh, hd = cache.keys[0].shape
        cap = cache.max_len
        c = model.config
        if (len(cache.keys), kvh, hd) != (c.num_layers, c.num_kv_heads, c.head_dim):
            raise ValueError(
                f"this float cache has {len(cache.keys)} layers of {kvh} heads of {hd}, the model "
                f"{c.num_layers} of {c.num_kv_heads} of {c.head_dim}: it was built for another model; "
                "use make_cache(model, 'float', ...)"
            )
    elif isinstance(cache, CompressedKVCache):
        if cache.config != model.config:
            raise ValueError(
                f"this {cache.method} cache was built for another model (config {cache.config}, the model's is "
                f"{model.config}); build it with make_cache(model, ...) for this model"
            )
        cap = cache.max_len
    else:
        raise TypeError(f"kv_cache must be a cache from make_cache, got {type(cache).__name__}")
    if int(cache.length) != 0:
        raise ValueError(f"kv_cache already holds {int(cache.length)} tokens; pass an empty cache (make_cache)")
    if num_tokens > cap:
        raise ValueError(
            f"{num_tokens} tokens exceed the cache's max_len={cap}; "
            f"create it with make_cache(..., max_len={num_tokens})"
        )
