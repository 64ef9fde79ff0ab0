"""The decoder against an independent float64 numpy Llama, the KV cache against the full forward."""

import jax
import jax.numpy as jnp
import llm_reference as reference
import numpy as np
import pytest

from vqlib.llm import (
    Block,
    LlamaConfig,
    Model,
    Params,
    attention,
    forward,
    generate,
    init_float_cache,
    init_params,
    perplexity,
)
from vqlib.llm._model import token_nll


def tiny_model(seed=0, *, tied=True, **overrides):
    shape = dict(reference.TINY, **overrides)
    weights = reference.random_weights(seed, tied=tied, **shape)
    config = LlamaConfig(**shape, rope_theta=10_000.0, norm_eps=1e-5, tie_embeddings=tied)
    blocks = tuple(Block(**{k: jnp.asarray(v) for k, v in b.items()}) for b in weights["blocks"])
    head = None if tied else jnp.asarray(weights["lm_head"])
    params = Params(jnp.asarray(weights["embed"]), blocks, jnp.asarray(weights["final_norm"]), head)
    return weights, Model(config, params)


@pytest.mark.parametrize("tied", [True, False])
def test_forward_matches_numpy_llama(tied):
    weights, model = tiny_model(1, tied=tied)
    tokens = np.random.default_rng(2).integers(0, model.config.vocab_size, size=(2, 11))
    logits, cache = forward(model.params, model.config, jnp.asarray(tokens, jnp.int32))
    assert cache is None and logits.shape == (2, 11, model.config.vocab_size)
    for b in range(2):
        want = reference.forward(weights, tokens[b], num_heads=4, num_kv_heads=2, head_dim=8)
        np.testing.assert_allclose(np.asarray(logits[b]), want, rtol=1e-4, atol=1e-4)


def test_multi_query_and_full_heads():
    for kv in (1, 4):
        weights, model = tiny_model(3, num_kv_heads=kv)
        tokens = np.arange(7) * 13 % model.config.vocab_size
        logits, _ = forward(model.params, model.config, jnp.asarray(tokens[None], jnp.int32))
        want = reference.forward(weights, tokens, num_heads=4, num_kv_heads=kv, head_dim=8)
        np.testing.assert_allclose(np.asarray(logits[0]), want, rtol=1e-4, atol=1e-4)


def test_cache_prefill_then_decode_equals_full_forward():
    _, model = tiny_model(4)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 300, size=(2, 12)), jnp.int32)
    full, _ = forward(model.params, model.config, tokens)
    cache = init_float_cache(model.config, batch=2, max_len=16)
    got, cache = forward(model.params, model.config, tokens[:, :5], cache)
    steps = [got]
    for t in range(5, 12):
        logits, cache = forward(model.params, model.config, tokens[:, t : t + 1], cache)
        steps.append(logits)
    assert int(cache.length) == 12
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


def test_decode_step_compiles_once():
    _, model = tiny_model(6)
    cache = init_float_cache(model.config, batch=1, max_len=8)
    _, cache = forward(model.params, model.config, jnp.zeros((1, 3), jnp.int32), cache)
    one = jnp.zeros((1, 1), jnp.int32)
    _, cache = forward(model.params, model.config, one, cache)
    before = forward._cache_size()
    for _ in range(3):
        _, cache = forward(model.params, model.config, one, cache)
    assert forward._cache_size() == before


def test_generate_greedy_and_capacity():
    weights, model = tiny_model(7)
    prompt = np.array([[5, 17, 42]])
    out = generate(model, prompt, 4)
    seq = list(prompt[0])
    for _ in range(4):  # greedy continuation from the float64 reference
        seq.append(int(np.argmax(reference.forward(weights, seq, num_heads=4, num_kv_heads=2, head_dim=8)[-1])))
    assert out.tolist() == [seq[3:]]
    with pytest.raises(ValueError, match="max_len"):
        generate(model, prompt, 10, kv_cache=init_float_cache(model.config, 1, 8))


@pytest.mark.parametrize("prompt", [[9], [5, 17, 42]])
def test_generate_leaves_the_callers_cache_usable(prompt):
    """Decode steps donate the cache (updated in place); generate works on its own copy, so the
    caller's cache, even with a one-token prompt (no prefill before the first step), can be used
    again and gives the same tokens."""
    _, model = tiny_model(8)
    cache = init_float_cache(model.config, 1, 8)
    first = generate(model, np.array([prompt]), 3, kv_cache=cache)
    assert int(cache.length) == 0 and not cache.keys[0].is_deleted()
    np.testing.assert_array_equal(generate(model, np.array([prompt]), 3, kv_cache=cache), first)


def test_token_nll_vmaps_over_a_batch_axis():
    _, model = tiny_model(8)
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, 300, size=(3, 2, 6)), jnp.int32)
    batched = jax.vmap(lambda t: token_nll(model.params, model.config, t))(tokens)
    flat = token_nll(model.params, model.config, tokens.reshape(6, 6))
    np.testing.assert_allclose(batched.reshape(6, 5), flat, rtol=1e-5, atol=1e-6)


def test_perplexity_equals_exp_mean_nll_of_reference():
    weights, model = tiny_model(10)
    ids = np.random.default_rng(11).integers(0, 300, size=50)
    ppl = perplexity(model, ids, ctx=16)  # 3 windows, the 2-token tail dropped
    nll = []
    for w in ids[:48].reshape(3, 16):
        logits = reference.forward(weights, w, num_heads=4, num_kv_heads=2, head_dim=8)[:-1]
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        nll += list(-logp[np.arange(15), w[1:]])
    assert ppl == pytest.approx(np.exp(np.mean(nll)), rel=1e-5)
    assert perplexity(model, ids, ctx=16, max_windows=1) != ppl


def test_attention_masks_future_and_unwritten_slots():
    q = jnp.ones((1, 2, 2, 4))
    k = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 1, 4)), jnp.float32)
    v = jnp.arange(20, dtype=jnp.float32).reshape(1, 5, 1, 4)
    out = attention(q, k, v, jnp.array([0, 1]), jnp.array([0, 1, 9, 9, 9]))
    np.testing.assert_allclose(out[0, 0, 0], v[0, 0, 0])  # position 0 sees only key 0


def test_config_and_param_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaConfig(vocab_size=8, dim=8, num_layers=1, num_heads=3, num_kv_heads=2, head_dim=4, hidden_dim=8)
    with pytest.raises(ValueError, match="even"):
        LlamaConfig(vocab_size=8, dim=8, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=3, hidden_dim=8)
    cfg = LlamaConfig(vocab_size=8, dim=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, hidden_dim=8)
    assert init_params(jax.random.key(0), cfg).blocks[0].wk.shape == (4, 8)


def test_float_cache_past_max_len_gives_nan_not_a_clamped_write():
    """Buffers are padded to a multiple of ALIGN positions, but max_len is the capacity: a call
    that would store past it returns NaN (dynamic_update_slice would clamp it silently), and
    one that fits gives the float64 reference's logits."""
    weights, model = tiny_model(9)
    tokens = np.array([[3, 1, 4, 1, 5, 9]])
    cache = init_float_cache(model.config, 1, 5)
    assert cache.max_len == 5 and cache.keys[0].shape[1] % 64 == 0
    logits, cache = forward(model.params, model.config, jnp.asarray(tokens[:, :5]), cache)
    want = reference.forward(weights, tokens[0, :5], num_heads=4, num_kv_heads=2, head_dim=8)
    np.testing.assert_allclose(np.asarray(logits[0]), want, rtol=1e-4, atol=1e-4)
    over, _ = forward(model.params, model.config, jnp.asarray(tokens[:, 5:]), cache)
    assert np.all(np.isnan(np.asarray(over)))
