"""Block-wise fine-tuning of a compressed block's continuous parameters (AQLM's block step).

After a block's seven matrices are compressed, Adam (optax) tunes every part's codebooks and
row scales, and the block's two RMSNorm gains, with the codes frozen, so that the block's output
on calibration inputs matches the float block's output on the same inputs:

    min  mean ||block_q(h) - block_float(h)||^2 / mean ||block_float(h) - h||^2

(the denominator is the block's own contribution to the residual stream, so the loss starts
near the block's relative error). The best parameters seen are kept (never worse than the
start). Codebooks and scales are stored back in float16. A part whose scales were one number
for the whole matrix (QuIP#'s step) gets one scale per row, as the fine-tuned model needs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from jax import lax

from vqlib import _checks
from vqlib.llm._model import block_outputs
from vqlib.llm._weights import CompressedWeight

OPTIONS = ("finetune_steps", "finetune_sequences", "finetune_lr")


def check_options(options: dict, *, steps: int = 0) -> dict:
    """The fine-tuning options (defaults: `steps` steps, 4 sequences, lr 1e-3)."""
    return dict(
        finetune_steps=_checks.check_int(options.get("finetune_steps", steps), "finetune_steps", low=0),
        finetune_sequences=_checks.check_int(options.get("finetune_sequences", 4), "finetune_sequences", low=1),
        finetune_lr=_checks.check_nonnegative_float(options.get("finetune_lr", 1e-3), "finetune_lr"),
    )


def weight_trainables(w: CompressedWeight, *, per_row: bool = True) -> tuple:
    """(codebooks float32 or None, scales float32) of every part of w: one scale per row
    (out,), or (per_row=False) the scales' stored shape ((1,) for one per matrix)."""
    return tuple(
        (
            None if p.codebooks is None else p.codebooks.astype(jnp.float32),
            jnp.broadcast_to(p.scales.astype(jnp.float32), (p.shape[0],)) if per_row else p.scales.astype(jnp.float32),
        )
        for p in w.parts
    )


def with_trainables(w: CompressedWeight, parts: tuple, dtype=jnp.float32) -> CompressedWeight:
    """w with the codebooks and scales of `parts` (as weight_trainables gives them), in dtype."""
    return dataclasses.replace(
        w,
        parts=tuple(
            dataclasses.replace(p, codebooks=None if cb is None else cb.astype(dtype), scales=s.astype(dtype))
            for p, (cb, s) in zip(w.parts, parts, strict=True)
        ),
    )


def block_trainables(blk, *, per_row: bool = True):
    mats = {
        f.name: weight_trainables(getattr(blk, f.name), per_row=per_row)
        for f in dataclasses.fields(blk)
        if isinstance(getattr(blk, f.name), CompressedWeight)
    }
    return mats, (blk.attn_norm.astype(jnp.float32), blk.mlp_norm.astype(jnp.float32))


def with_block_trainables(blk, params, dtype=jnp.float32):
    mats, norms = params
    new = {name: with_trainables(getattr(blk, name), parts, dtype) for name, parts in mats.items()}
    return dataclasses.replace(blk, attn_norm=norms[0], mlp_norm=norms[1], **new)


@functools.partial(jax.jit, static_argnames=("steps",))
def _adam(params, blk, config, h, target, lr, *, steps: int):
    scale = jnp.mean((target - h) ** 2)

    def loss(p):
        return jnp.mean((block_outputs(with_block_trainables(blk, p), config, h) - target) ** 2) / scale

    opt = optax.adam(lr)

    def step(carry, _):
        p, state, best, best_loss = carry
        value, grad = jax.value_and_grad(loss)(p)
        better = value < best_loss
        best = jax.tree.map(lambda a, b: jnp.where(better, a, b), p, best)
        best_loss = jnp.minimum(value, best_loss)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 step counts
            updates, state = opt.update(grad, state, p)
        return (optax.apply_updates(p, updates), state, best, best_loss), None

    first = loss(params)
    (p, _, best, best_loss), _ = lax.scan(step, (params, opt.init(params), params, first), None, length=steps)
    last = loss(p)
    return jax.tree.map(lambda a, b: jnp.where(last < best_loss, a, b), p, best), first, jnp.minimum(last, best_loss)


def finetune_block(key, blk, float_blk, config, h, *, finetune_steps: int, finetune_sequences: int, finetune_lr: float):
    """The block with tuned codebooks, scales and norm gains (codes unchanged); see the module docstring.

    Returns:
        (block, (relative loss before, after)).
    """
    if finetune_steps == 0:
        return blk, None
    pick = jax.random.choice(key, h.shape[0], (min(finetune_sequences, h.shape[0]),), replace=False)
    hs = h[pick]
    target = block_outputs(float_blk, config, hs)
    params, before, after = _adam(block_trainables(blk), blk, config, hs, target, finetune_lr, steps=finetune_steps)
    return with_block_trainables(blk, params, jnp.float16), (float(before), float(after))
