"""`vqlib.llm.compress(model, method, bits=...)`: post-training compression of every linear weight.

Methods (one module each, same four entry points: check_options, check_shape, compress_weight,
NEEDS_CALIBRATION; AQLM adds finetune_block):
    "rtn"    per-group asymmetric round-to-nearest (`_rtn.py`), no calibration;
    "gptvq"  GPTQ error feedback with 1/2/4-dim codebooks per column group (`_gptvq.py`);
    "aqlm"   additive codebooks over groups of 8 weights, output-error objective (`_aqlm.py`);
    "quip"   randomized Hadamard incoherence + E8P lattice codes + LDLQ (`_quip.py`).

Calibrated methods run the model block by block (GPTQ's sequential order): the calibration
windows go through the blocks already compressed; inside a block, q/k/v are compressed from
the Hessian H = X^T X / N of their shared input, then o from the attention output the
compressed q/k/v produce, then gate/up, then down. The token embedding (the head, when tied)
is compressed last, from the Hessian of the final normed hidden states; an untied input
embedding gets the identity (plain squared error).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vqlib import _checks
from vqlib import _progress as _bars
from vqlib.llm import _finetune
from vqlib.llm._config import LlamaConfig
from vqlib.llm._eval import as_tokens
from vqlib.llm._model import (
    LINEARS,
    Block,
    Model,
    Params,
    attention_context,
    block_outputs,
    mlp_hidden,
    rms_norm,
    rope_tables,
)
from vqlib.llm._weights import CompressedWeight, dense, linear, stored_bits

METHODS = {
    "rtn": "vqlib.llm._rtn",
    "gptvq": "vqlib.llm._gptvq",
    "aqlm": "vqlib.llm._aqlm",
    "quip": "vqlib.llm._quip",
}


def method_module(method: str):
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    return importlib.import_module(METHODS[method])


# ----------------------------------------------------------------------------- accounting


def weight_count(params: Params) -> int:
    """Weights of the float model `params` stands for (every matrix and norm gain)."""
    leaves = [params.embed, params.final_norm, *([] if params.lm_head is None else [params.lm_head])]
    for blk in params.blocks:
        leaves += [getattr(blk, f.name) for f in dataclasses.fields(blk)]
    return sum(int(np.prod(w.shape)) for w in leaves)


def bits_per_weight(model: Model) -> float:
    """Stored bits of every parameter (codes, codebooks, scales, rotations, norms, float layers)
    divided by the number of weights of the float model."""
    return stored_bits(model.params) / weight_count(model.params)


def model_bytes(model: Model) -> int:
    """Bytes of the parameters as stored (the tokenizer and file header not included)."""
    return stored_bits(model.params) // 8


def decompress(model: Model) -> Model:
    """The float model a compressed model stands for: every compressed matrix decoded once to
    float32 (out, in), norms and float layers as they are.

    A forward pass of the result computes the compressed model's function up to float rounding
    (the same decoded values, multiplied in another order) at the float model's speed and memory:
    for evaluating many windows, or for exporting to a float format. The compressed model keeps
    its bits; this one does not.

    Example:
        >>> import jax
        >>> from vqlib.llm import LlamaConfig, Model, init_params
        >>> from vqlib.llm import compress, decompress
        >>> cfg = LlamaConfig(vocab_size=32, dim=32, num_layers=1, num_heads=2, num_kv_heads=1,
        ...                   head_dim=16, hidden_dim=64)
        >>> m = compress(Model(cfg, init_params(jax.random.key(0), cfg)), "rtn", bits=4, group_size=16)
        >>> decompress(m).params.blocks[0].wq.dtype
        dtype('float32')
    """
    p = model.params
    blocks = tuple(dataclasses.replace(blk, **{n: dense(getattr(blk, n)) for n in LINEARS}) for blk in p.blocks)
    params = dataclasses.replace(
        p, embed=dense(p.embed), blocks=blocks, lm_head=None if p.lm_head is None else dense(p.lm_head)
    )
    return dataclasses.replace(model, params=params)


# ----------------------------------------------------------------------------- calibration


def calibration_windows(model: Model, calibration, *, num_sequences: int, seq_len: int, key) -> np.ndarray:
    """(num_sequences, seq_len) int32 windows drawn without replacement from the non-overlapping
    windows of the calibration tokens (all of them when there are fewer)."""
    ids = as_tokens(model, calibration)
    count = len(ids) // seq_len
    if count == 0:
        raise ValueError(f"calibration has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    wins = ids[: count * seq_len].reshape(count, seq_len)
    if count <= num_sequences:
        return wins
    pick = np.sort(np.asarray(jax.random.choice(key, count, (num_sequences,), replace=False)))
    return wins[pick]


@jax.jit
def _gram(x):
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return jnp.dot(x.T, x, precision=lax.Precision.HIGHEST)


def hessian(x: jax.Array, batch: int = 8) -> np.ndarray:
    """H = X^T X / N (float64 numpy) of activations x (s, t, d), accumulated over batches of sequences."""
    total = sum(np.asarray(_gram(x[i : i + batch]), np.float64) for i in range(0, x.shape[0], batch))
    return total / (x.shape[0] * x.shape[1])


def _batched(fn, *args, x, batch: int = 8):
    """fn(*args, chunk) over leading-axis chunks of x, concatenated (bounds the attention's memory)."""
    return jnp.concatenate([fn(*args, x[i : i + batch]) for i in range(0, x.shape[0], batch)], axis=0)


@jax.jit
def _attn_context(blk: Block, config: LlamaConfig, a):
    positions = jnp.arange(a.shape[1], dtype=jnp.int32)
    cos, sin = rope_tables(config, positions)
    return attention_context(blk, config, a, cos, sin, positions, None, 0)[0]


@jax.jit
def _linear(w, x):
    return linear(x, w)


@jax.jit
def _mlp(blk: Block, m):
    return mlp_hidden(blk, m)


@functools.partial(jax.jit, static_argnames="eps")
def _norm(h, gain, eps: float):
    return rms_norm(h, gain, eps)


# ----------------------------------------------------------------------------- the front door


def _progress(desc: str, total: int, enabled: bool):
    """step(done): advances a tqdm bar (vqlib._progress: silent off a terminal) to `done` of `total`."""
    bar = _bars.steps(total, desc=desc, enabled=enabled)

    def step(done: int, note: str = ""):
        bar.update(done - bar.n)
        if note:
            bar.set_postfix_str(note)
        if done == total:
            bar.close()

    return step


@dataclasses.dataclass(frozen=True)
class Plan:
    """What compress() replaces: the blocks `layers`, the embedding / head if `embedding`."""

    layers: frozenset
    embedding: bool
    opts: dict
    head_opts: dict


def _weights(params: Params, plan: Plan):
    """(name, weight) of every matrix compress() replaces."""
    for i, blk in enumerate(params.blocks):
        if i in plan.layers:
            for name in LINEARS:
                yield f"blocks.{i}.{name}", getattr(blk, name)
    if plan.embedding:
        yield "embed", params.embed
        if params.lm_head is not None:
            yield "lm_head", params.lm_head


def _compress_head(mod, plan: Plan, key, params: Params, head_hessian):
    """(embed, lm_head): the tied embedding from the head's Hessian; an untied one from identity."""
    if not plan.embedding:
        return params.embed, params.lm_head
    opts = plan.head_opts
    if params.lm_head is None:
        return mod.compress_weight(key, params.embed, head_hessian, embedding=True, **opts), None
    embed = mod.compress_weight(key, params.embed, None, embedding=True, **opts)
    return embed, mod.compress_weight(jax.random.fold_in(key, 1), params.lm_head, head_hessian, **opts)


def compress(
    model: Model,
    method: str,
    *,
    bits: int,
    calibration=None,
    key=None,
    head_bits: int | None = None,
    layers=None,
    compress_embedding: bool = True,
    num_sequences: int = 64,
    seq_len: int = 512,
    progress: bool = False,
    **options,
) -> Model:
    """Compresses every linear weight of `model` (and its embedding) with `method`.

    Args:
        model: a float Model (from `vqlib.llm.load`).
        method: "rtn", "gptvq", "aqlm" or "quip" (module docstring).
        bits: bits per weight of the codes (codebooks, scales and rotations come on top; see
            `bits_per_weight`). rtn: 1-8; gptvq: 1-8 (codes of bits * vector_dim bits);
            aqlm: 1-8 with 8-bit codebooks (num_codebooks = bits); quip: 2 to 6 (E8P stages, E81B for
            an odd bit).
        calibration: text or token ids (not from the evaluation split); required by gptvq,
            aqlm and quip.
        key: PRNG key (default jax.random.key(0)).
        head_bits: bits for the token embedding / output head (default `bits`).
        num_sequences, seq_len: calibration windows (drawn from `calibration`).
        progress: a progress bar per block on stderr.
        **options: the method's options (see its module): rtn group_size; gptvq vector_dim,
            group_cols, kmeans_iters, update_steps; aqlm num_codebooks, codebook_bits, ...;
            quip rms_scale.

    Returns:
        A new Model whose matrices are `CompressedWeight`s; `model.describe()` gives the method,
        options, bits per weight and the seconds compression took.

    Raises:
        ValueError: unknown method, bits the method cannot do, a layer whose shape the method
            cannot take (named), missing calibration. Nothing is computed before these checks.
    """
    start = time.perf_counter()
    if not isinstance(model, Model):
        raise TypeError(f"model must be a vqlib.llm Model (from vqlib.llm.load), got {type(model).__name__}")
    mod = method_module(method)
    opts = mod.check_options(bits, dict(options))
    head_opts = mod.check_options(bits if head_bits is None else head_bits, dict(options))
    num_blocks = len(model.params.blocks)
    layers = tuple(range(num_blocks)) if layers is None else tuple(layers)
    for i in layers:
        _checks.check_int(i, "layers[i]", low=0, high=num_blocks - 1)
    plan = Plan(frozenset(layers), bool(compress_embedding), opts, head_opts)
    for name, w in _weights(model.params, plan):
        if isinstance(w, CompressedWeight) or not hasattr(w, "dtype"):
            raise ValueError(f"{name} is already compressed; compress the float model")
        mod.check_shape(name, w.shape, **(head_opts if name in ("embed", "lm_head") else opts))
    if mod.NEEDS_CALIBRATION and calibration is None:
        raise ValueError(
            f"method {method!r} needs calibration data: pass calibration= text or token ids "
            "(not from the evaluation split, e.g. WikiText-2 validation)"
        )
    num_sequences = _checks.check_int(num_sequences, "num_sequences", low=1)
    seq_len = _checks.check_int(seq_len, "seq_len", low=2)
    key = jax.random.key(0) if key is None else key
    if mod.NEEDS_CALIBRATION:
        data_key, key = jax.random.split(key)
        wins = calibration_windows(model, calibration, num_sequences=num_sequences, seq_len=seq_len, key=data_key)
        params = _sequential(model, mod, plan, wins, key, progress, method)
    else:
        params = _independent(model, mod, plan, key, progress, method)
    params = jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    compressed = Model(model.config, params, model.tokenizer, ())
    record = dict(opts, head_bits=head_opts["bits"] if plan.embedding else None)
    if len(layers) < num_blocks:
        record["layers"] = list(layers)
    if mod.NEEDS_CALIBRATION:
        record |= dict(num_sequences=len(wins), seq_len=seq_len)
    info = (
        *[(k, v) for k, v in model.info if k in ("source", "format", "name")],
        ("method", method),
        ("options", json.dumps(record, sort_keys=True)),
        ("bits_per_weight", round(bits_per_weight(compressed), 4)),
        ("seconds", round(seconds, 2)),
    )
    return dataclasses.replace(compressed, info=info)


def _independent(model, mod, plan: Plan, key, progress, method) -> Params:
    params = model.params
    step = _progress(f"compress {method}", len(params.blocks) + 1, progress)
    blocks = []
    for i, blk in enumerate(params.blocks):
        if i in plan.layers:
            keys = jax.random.split(jax.random.fold_in(key, i), len(LINEARS))
            blk = dataclasses.replace(
                blk,
                **{
                    n: mod.compress_weight(k, getattr(blk, n), None, **plan.opts)
                    for n, k in zip(LINEARS, keys, strict=True)
                },
            )
        blocks.append(blk)
        step(i + 1)
    embed, lm_head = _compress_head(mod, plan, jax.random.fold_in(key, 1 << 20), params, None)
    step(len(params.blocks) + 1)
    return Params(embed=embed, blocks=tuple(blocks), final_norm=params.final_norm, lm_head=lm_head)


def _compress_block(mod, opts, key, float_blk: Block, config: LlamaConfig, h) -> Block:
    """One block, in GPTQ's order (q/k/v, o, gate/up, down), each from its input's Hessian."""
    keys = iter(jax.random.split(key, len(LINEARS) + 1))
    eps = config.norm_eps

    def comp(name, x_hessian):
        return mod.compress_weight(next(keys), getattr(float_blk, name), x_hessian, **opts)

    a = _norm(h, float_blk.attn_norm, eps)
    hq = hessian(a)
    blk = dataclasses.replace(float_blk, wq=comp("wq", hq), wk=comp("wk", hq), wv=comp("wv", hq))
    ctx = _batched(_attn_context, blk, config, x=a)
    blk = dataclasses.replace(blk, wo=comp("wo", hessian(ctx)))
    h2 = h + _batched(_linear, blk.wo, x=ctx)
    m = _norm(h2, blk.mlp_norm, eps)
    hm = hessian(m)
    blk = dataclasses.replace(blk, w_gate=comp("w_gate", hm), w_up=comp("w_up", hm))
    g = _batched(_mlp, blk, x=m)
    blk = dataclasses.replace(blk, w_down=comp("w_down", hessian(g)))
    tune = {name: opts[name] for name in _finetune.OPTIONS if name in opts}
    if tune.get("finetune_steps"):
        blk, _ = _finetune.finetune_block(next(keys), blk, float_blk, config, h, **tune)
    return blk


def _sequential(model, mod, plan: Plan, wins, key, progress, method) -> Params:
    params, config = model.params, model.config
    step = _progress(f"compress {method}", len(params.blocks) + 1, progress)
    h = jnp.take(params.embed, jnp.asarray(wins), axis=0)  # (s, t, dim): the float embedding
    blocks = []
    last = max(plan.layers, default=-1)
    for i, blk in enumerate(params.blocks):
        if i > last and not plan.embedding:
            blocks.append(blk)  # nothing compressed from here on: no need to run the rest
            step(i + 1)
            continue
        if i in plan.layers:
            blk = _compress_block(mod, plan.opts, jax.random.fold_in(key, i), blk, config, h)
        h = _batched(block_outputs, blk, config, x=h)
        blocks.append(blk)
        step(i + 1)
    head_hessian = hessian(_norm(h, params.final_norm, config.norm_eps)) if plan.embedding else None
    embed, lm_head = _compress_head(mod, plan, jax.random.fold_in(key, 1 << 20), params, head_hessian)
    step(len(params.blocks) + 1)
    return Params(embed=embed, blocks=tuple(blocks), final_norm=params.final_norm, lm_head=lm_head)
