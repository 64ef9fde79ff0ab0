"""End-to-end fine-tuning of a compressed model against the float model it came from.

The last step of QuIP# (its end-to-end fine-tuning) and of AQLM (global fine-tuning): with every
code frozen, Adam (optax) tunes the parameters a compressed model keeps in float (every part's
codebooks and row scales, the RMSNorm gains) so that its next-token distribution matches the
float model's on calibration windows, the distillation objective

    min  mean over tokens t of  KL(p_float(. | x_<t) || p_compressed(. | x_<t)).

Block-wise fine-tuning (`_finetune.py`) matches each block's output on its own; this one sees
what the errors of all blocks and the head do together to the logits, which is what perplexity
measures. A quarter of the calibration windows (at least one) is held out: the tuned parameters
are kept only if they lower the held-out KL, so the result is never worse than the start on text
the optimiser did not see. Codebooks and scales are stored back in float16 (their stored format),
so the model's size does not change.

Cost: a step is a forward of the float model and a forward and a backward of the compressed one
over batch_size x seq_len tokens (3-8 s for 2 x 256 tokens of SmolLM2-135M on a 2-core CPU).
Each block is recomputed in the backward pass (`jax.checkpoint`) rather than keeping every
layer's decoded weights; without that, a benchmark process distilling SmolLM2-135M peaked at
about 10 GB.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from vqlib import _checks
from vqlib import _progress as _bars
from vqlib.llm._compress import calibration_windows
from vqlib.llm._finetune import block_trainables, weight_trainables, with_block_trainables, with_trainables
from vqlib.llm._model import Model, Params, forward, hidden_states
from vqlib.llm._weights import CompressedWeight, linear

HEADS = ("embed", "lm_head")


def _trainable(params: Params):
    blocks = tuple(block_trainables(blk, per_row=False) for blk in params.blocks)
    heads = {
        n: weight_trainables(getattr(params, n), per_row=False)
        for n in HEADS
        if isinstance(getattr(params, n), CompressedWeight)
    }
    return blocks, heads, params.final_norm.astype(jnp.float32)


def _with(params: Params, t, dtype=jnp.float32) -> Params:
    blocks, heads, final_norm = t
    new = {n: with_trainables(getattr(params, n), parts, dtype) for n, parts in heads.items()}
    rebuilt = tuple(with_block_trainables(blk, p, dtype) for blk, p in zip(params.blocks, blocks, strict=True))
    return dataclasses.replace(params, blocks=rebuilt, final_norm=final_norm.astype(params.final_norm.dtype), **new)


def _kl(params: Params, reference: Params, config, tokens) -> jax.Array:
    """Mean over tokens of KL(p_reference || p_params), tokens (b, t); the compressed model's
    blocks rematerialised in the backward pass (one block's decoded weights held at a time)."""
    logp_ref = jax.nn.log_softmax(lax.stop_gradient(forward(reference, config, tokens)[0]), axis=-1)
    logp = jax.nn.log_softmax(linear(hidden_states(params, config, tokens, remat=True)[0], params.head), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(logp_ref) * (logp_ref - logp), axis=-1))


@functools.partial(jax.jit, static_argnames=("lr",))
def _steps(t, state, params: Params, reference: Params, config, batches, *, lr: float):
    """Adam over batches (steps, b, seq): the new trainables, state and each step's KL."""
    opt = optax.adam(lr)

    def step(carry, tokens):
        t, state = carry
        value, grad = jax.value_and_grad(lambda p: _kl(_with(params, p), reference, config, tokens))(t)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 step counts
            updates, state = opt.update(grad, state, t)
        return (optax.apply_updates(t, updates), state), value

    (t, state), losses = lax.scan(step, (t, state), batches)
    return t, state, losses


@jax.jit
def _held_out_kl(params: Params, reference: Params, config, batches) -> jax.Array:
    return jnp.mean(lax.map(lambda tokens: _kl(params, reference, config, tokens), batches))


def distill(
    model: Model,
    reference: Model,
    calibration,
    *,
    steps: int = 100,
    batch_size: int = 2,
    seq_len: int = 256,
    num_sequences: int = 64,
    lr: float = 1e-4,
    chunk: int = 10,
    key=None,
    progress: bool = False,
) -> tuple[Model, dict]:
    """Fine-tunes the compressed `model`'s float parameters to match `reference` (module docstring).

    Args:
        model: a compressed Model (from `vqlib.llm.compress`).
        reference: the float Model it was compressed from (same config).
        calibration: text or token ids, not from the evaluation split.
        steps: Adam steps, each on `batch_size` windows of `seq_len` tokens, cycling through the
            training windows.
        num_sequences: calibration windows drawn; a quarter (at least one) is held out.
        lr: Adam's learning rate.
        chunk: steps per compiled call (a progress update between calls).
        key: PRNG key of the window draw (default jax.random.key(0)).

    Returns:
        (model, report): the tuned model (the input model, unchanged, when the held-out KL did
        not fall) and a dict with the held-out KL before and after, the training losses, the
        seconds taken and whether the tuned parameters were kept.

    Raises:
        TypeError: model or reference is not a Model.
        ValueError: the two configs differ, the model has no compressed weight, or fewer than two
            calibration windows of seq_len tokens.
    """
    start = time.perf_counter()
    for name, m in (("model", model), ("reference", reference)):
        if not isinstance(m, Model):
            raise TypeError(f"{name} must be a vqlib.llm Model, got {type(m).__name__}")
    if model.config != reference.config:
        raise ValueError("model and reference have different configs: pass the float model `model` was compressed from")
    t0 = _trainable(model.params)
    if not t0[1] and not any(mats for mats, _ in t0[0]):
        raise ValueError("model has no compressed weight to tune: pass the output of vqlib.llm.compress")
    steps = _checks.check_int(steps, "steps", low=1)
    batch_size = _checks.check_int(batch_size, "batch_size", low=1)
    seq_len = _checks.check_int(seq_len, "seq_len", low=2)
    chunk = _checks.check_int(chunk, "chunk", low=1)
    lr = _checks.check_nonnegative_float(lr, "lr")
    key = jax.random.key(0) if key is None else key
    tokenizing = model if model.tokenizer is not None else reference  # a saved model may carry none
    wins = calibration_windows(tokenizing, calibration, num_sequences=num_sequences, seq_len=seq_len, key=key)
    if len(wins) < 2:
        raise ValueError(
            f"calibration gives {len(wins)} window of seq_len={seq_len} tokens; distill needs two (one held out): "
            "pass more calibration text or a smaller seq_len"
        )
    held = max(1, len(wins) // 4)
    train, test = jnp.asarray(wins[held:]), jnp.asarray(wins[:held])
    order = np.arange(steps * batch_size) % len(train)
    batches = train[order].reshape(steps, batch_size, seq_len)
    params, ref, config = model.params, reference.params, model.config
    held_out = test[:, None]  # one window per held-out evaluation
    before = float(_held_out_kl(params, ref, config, held_out))
    t, state = t0, optax.adam(lr).init(t0)
    losses = []
    bar = _bars.steps(steps, desc="distill", enabled=progress)
    for i in range(0, steps, chunk):
        t, state, chunk_losses = _steps(t, state, params, ref, config, batches[i : i + chunk], lr=lr)
        losses.extend(np.asarray(chunk_losses).tolist())
        bar.update(len(chunk_losses))
        bar.set_postfix_str(f"KL {np.mean(losses[-len(chunk_losses) :]):.4f}")
    bar.close()
    tuned = _with(params, t, jnp.float16)  # as stored: what the held-out check must judge
    after = float(_held_out_kl(tuned, ref, config, held_out))
    kept = after < before
    report = dict(
        held_out_kl_before=before,
        held_out_kl_after=after,
        kept=kept,
        train_kl=losses,
        steps=steps,
        seconds=time.perf_counter() - start,
    )
    if not kept:
        return model, report
    info = (*model.info, ("distill", f"{steps} steps, held-out KL {before:.4f} -> {after:.4f}"))
    return dataclasses.replace(model, params=tuned, info=info), report
