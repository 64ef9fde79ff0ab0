"""End-to-end distillation of a compressed model: the held-out KL falls, codes and size stay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlib.llm import LlamaConfig, Model, forward, init_params
from vqlib.llm._compress import compress
from vqlib.llm._distill import distill
from vqlib.llm._weights import stored_bits

CONFIG = LlamaConfig(
    vocab_size=128, dim=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, hidden_dim=64, tie_embeddings=True
)
CALIB = np.random.default_rng(0).integers(0, 128, size=12 * 32)


@pytest.fixture(scope="module")
def pair():
    float_model = Model(CONFIG, init_params(jax.random.key(0), CONFIG, scale=0.15))
    small = compress(float_model, "rtn", bits=2, group_size=16)
    return float_model, small


def _kl64(model, reference, tokens) -> float:
    """Mean KL(p_reference || p_model) per token in float64 numpy (an independent reference)."""
    lr = np.asarray(forward(reference.params, reference.config, tokens)[0], np.float64)
    lm = np.asarray(forward(model.params, model.config, tokens)[0], np.float64)
    logp = lambda z: z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))  # noqa: E731
    pr, pm = logp(lr), logp(lm)
    return float(np.mean(np.sum(np.exp(pr) * (pr - pm), -1)))


def test_distill_lowers_held_out_kl_and_keeps_codes_and_size(pair):
    float_model, small = pair
    tuned, report = distill(small, float_model, CALIB, steps=30, batch_size=2, seq_len=32, num_sequences=12, lr=3e-3)
    assert report["kept"] and report["held_out_kl_after"] < 0.9 * report["held_out_kl_before"], report
    # the report's figures are what float64 numpy measures on the held-out windows (the first 3 of 12)
    held = jnp.asarray(CALIB.reshape(12, 32)[:3])
    assert _kl64(small, float_model, held) == pytest.approx(report["held_out_kl_before"], rel=1e-3)
    assert _kl64(tuned, float_model, held) == pytest.approx(report["held_out_kl_after"], rel=1e-3)
    assert stored_bits(tuned.params) == stored_bits(small.params)
    for a, b in zip(tuned.params.blocks, small.params.blocks, strict=True):
        np.testing.assert_array_equal(a.w_up.parts[0].codes, b.w_up.parts[0].codes)
    assert not np.array_equal(tuned.params.blocks[0].w_up.parts[0].scales, small.params.blocks[0].w_up.parts[0].scales)
    assert dict(tuned.info)["distill"].startswith("30 steps")


def test_distill_that_does_not_help_returns_the_model(pair):
    float_model, small = pair
    same, report = distill(small, float_model, CALIB, steps=2, seq_len=32, num_sequences=12, lr=0.0)
    assert same is small and not report["kept"]


def test_distill_bad_input(pair):
    float_model, small = pair
    with pytest.raises(TypeError, match="reference must be a vqlib.llm Model"):
        distill(small, float_model.params, CALIB)
    with pytest.raises(ValueError, match="no compressed weight"):
        distill(float_model, float_model, CALIB, seq_len=32)
    other = Model(CONFIG.__class__(**{**CONFIG.__dict__, "num_layers": 1}), init_params(jax.random.key(0), CONFIG))
    with pytest.raises(ValueError, match="different configs"):
        distill(small, other, CALIB)
    with pytest.raises(ValueError, match="needs two"):
        distill(small, float_model, CALIB[:40], seq_len=32)
