"""AQLM: additive codebooks over groups of 8 input weights, fitted to the layer's output error.

Row i of W (out, in), group j of g = 8 consecutive input weights:

    W[i, g j : g j + g] ~ s_i * sum_{m < M} C_m[b_{i,j,m}],     C_m (2**B, g), s_i a row scale,

M codebooks of 2**B entries each ("2x8": M = 2, B = 8 -> 2 bits per weight plus the codebooks).
Everything is fitted to the layer's output error on the calibration activations,
||X W^T - X W_hat^T||^2 = tr((W - W_hat) H (W - W_hat)^T), H = X^T X:

1. init: s_i = RMS(W_i); residual k-means on the groups of W / s (each group weighted by the
   mean of diag H over its columns, via `vqlib.fit(..., "kmeans", sample_weight=)`);
2. `rounds` times: (a) codes by beam search, group by group over the whole matrix (rows in
   parallel): for each codebook m in turn, every beam entry tries all 2**B codes of codebook m;
   a candidate is scored by the exact change of the output error, -2 s_i <d, (E H)_J> +
   s_i^2 d^T H_JJ d for a change d of the group's decoded vector, and the `beam` best survive;
   E H is updated after each group. (b) codebooks and scales with codes fixed: the loss is
   quadratic in the codebooks, so `refit_iters` conjugate-gradient steps solve for them (the
   paper's 100 Adam steps reach the same minimum more slowly), and each row scale has a closed
   form;
3. block fine-tuning (`_finetune.py`, after the block's seven matrices): Adam on every
   codebook, row scale and the two norm gains of the block, codes frozen, to match the float
   block's outputs on calibration inputs.

Stored: M codes of B bits per g weights, M float16 codebooks (2**B, g) per matrix, float16 row
scales: bits per weight M B / g + (M 2**B g + out) 16 / (out in).

References:
    Egiazarian et al., "Extreme compression of large language models via additive
    quantization" (AQLM), ICML 2024 (arXiv 2401.06118).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vqlib import _checks
from vqlib.codebooks import encode
from vqlib.llm import _finetune
from vqlib.llm._common import check_known, fit_centroids
from vqlib.llm._gptq import prepare
from vqlib.llm._weights import CompressedWeight, coded_part

NEEDS_CALIBRATION = True
OPTIONS = (
    "group_size",
    "codebook_bits",
    "num_codebooks",
    "beam",
    "rounds",
    "refit_iters",
    "kmeans_iters",
    "damp",
    *_finetune.OPTIONS,
)


def check_options(bits, options: dict) -> dict:
    bits = _checks.check_int(bits, "bits", low=1, high=16)
    check_known(options, OPTIONS, "aqlm")
    g = _checks.check_int(options.get("group_size", 8), "group_size", low=1, high=32)
    b = _checks.check_int(options.get("codebook_bits", 8), "codebook_bits", low=1, high=16)
    m = options.get("num_codebooks")
    if m is None:
        if (bits * g) % b:
            raise ValueError(
                f"bits={bits} with group_size={g} and codebook_bits={b} needs {bits * g / b:g} codebooks; "
                "choose bits * group_size divisible by codebook_bits (e.g. 2x8: bits=2, codebook_bits=8)"
            )
        m = bits * g // b
    m = _checks.check_int(m, "num_codebooks", low=1, high=8)
    if m * b != bits * g:
        raise ValueError(f"num_codebooks={m} x codebook_bits={b} gives {m * b / g:g} bits per weight, not bits={bits}")
    return dict(
        bits=bits,
        group_size=g,
        codebook_bits=b,
        num_codebooks=m,
        beam=_checks.check_int(options.get("beam", 4), "beam", low=1, high=64),
        rounds=_checks.check_int(options.get("rounds", 2), "rounds", low=1),
        refit_iters=_checks.check_int(options.get("refit_iters", 10), "refit_iters", low=0),
        kmeans_iters=_checks.check_int(options.get("kmeans_iters", 20), "kmeans_iters", low=1),
        damp=_checks.check_nonnegative_float(options.get("damp", 0.01), "damp"),
        **_finetune.check_options(options, steps=10),
    )


def check_shape(name: str, shape, *, group_size: int, codebook_bits: int, **_) -> None:
    out, n_in = shape
    if n_in % group_size:
        raise ValueError(
            f"{name} has {n_in} input columns, not a multiple of group_size={group_size}; "
            f"use a group_size dividing {n_in}"
        )
    if out * n_in // group_size < 2**codebook_bits:
        raise ValueError(
            f"{name} has {out * n_in // group_size} groups, fewer than the 2**{codebook_bits} codes of a codebook; "
            "use fewer codebook_bits"
        )


def decode(codebooks, codes, scales):
    """codebooks (M, K, g), codes (M, out, G) int, scales (out,) -> (out, G g) float32."""
    m = codebooks.shape[0]
    groups = sum(codebooks[i][codes[i]] for i in range(m))  # (out, G, g)
    return (groups * scales[:, None, None]).reshape(codes.shape[1], -1)


@functools.partial(jax.jit, static_argnames=("beam",))
def beam_search(w, h, codebooks, scales, codes, *, beam: int):
    """New codes (M, out, G) of lower output error, group by group (module docstring, step 2a)."""
    m, k, g = codebooks.shape
    out, n_in = w.shape
    eh = jnp.dot(w - decode(codebooks, codes, scales), h, precision=lax.Precision.HIGHEST)  # (out, in)
    sq = (scales * scales)[:, None, None]
    lin_s = scales[:, None, None]

    def group(carry, j):
        codes, eh = carry
        col = j * g
        grad = lax.dynamic_slice_in_dim(eh, col, g, axis=1)  # (out, g) = (E H)_J
        hjj = lax.dynamic_slice(h, (col, col), (g, g))
        cur = codes[:, :, j]  # (M, out)
        entries = cur[:, :, None]  # (M, out, B) codes of each beam entry
        delta = jnp.zeros((out, 1, g), jnp.float32)  # change of the group's unscaled vector
        score = jnp.zeros((out, 1), jnp.float32)
        for i in range(m):
            base = delta - codebooks[i][entries[i]]  # (out, B, g): delta without codebook i's term
            hb = jnp.dot(base, hjj, precision=lax.Precision.HIGHEST)  # (out, B, g)
            ck = codebooks[i]  # (K, g)
            quad = (
                jnp.sum(hb * base, -1)[..., None]
                + 2 * jnp.einsum("obg,kg->obk", hb, ck, precision=lax.Precision.HIGHEST)
                + jnp.sum(jnp.dot(ck, hjj, precision=lax.Precision.HIGHEST) * ck, -1)[None, None, :]
            )
            lin = (
                jnp.sum(base * grad[:, None, :], -1)[..., None]
                + jnp.einsum("og,kg->ok", grad, ck, precision=lax.Precision.HIGHEST)[:, None, :]
            )
            cand = -2 * lin_s * lin + sq * quad  # (out, B, K): change of the loss
            flat = cand.reshape(out, -1)
            keep = min(beam, flat.shape[1])
            neg, idx = lax.top_k(-flat, keep)
            parent, new = idx // k, idx % k
            entries = jnp.take_along_axis(entries, parent[None], axis=2).at[i].set(new)
            delta = jnp.take_along_axis(base, parent[..., None], axis=1) + ck[new]
            score = -neg
        best = jnp.argmin(score, axis=1)  # (out,)
        chosen = jnp.take_along_axis(entries, best[None, :, None], axis=2)[..., 0]  # (M, out)
        change = jnp.take_along_axis(delta, best[:, None, None], axis=1)[:, 0] * scales[:, None]  # (out, g)
        rows = lax.dynamic_slice_in_dim(h, col, g, axis=0)  # (g, in)
        eh = eh - jnp.dot(change, rows, precision=lax.Precision.HIGHEST)
        return (codes.at[:, :, j].set(chosen), eh), None

    (codes, _), _ = lax.scan(group, (codes, eh), jnp.arange(n_in // g))
    return codes


def _adjoint(g, codes, scales, k: int):
    """The transpose of `decode` in the codebooks: g (out, in) -> (M, K, gsize) sums of scaled groups."""
    m, out, groups = codes.shape
    pieces = (g * scales[:, None]).reshape(out * groups, -1)
    return jnp.stack([jax.ops.segment_sum(pieces, codes[i].reshape(-1), num_segments=k) for i in range(m)])


@functools.partial(jax.jit, static_argnames=("iters",))
def refit(codebooks, scales, codes, w, h, *, iters: int):
    """Codes fixed: least-squares codebooks by `iters` conjugate-gradient steps on
    min_C tr((W - W_hat) H (W - W_hat)^T) (W_hat is linear in C), then the optimal row scales
    s_i = <W_i H, v_i> / <v_i H, v_i> (v_i the unscaled decoded row), then CG again."""
    k = codebooks.shape[1]
    wh = jnp.dot(w, h, precision=lax.Precision.HIGHEST)

    def op(c, s):
        return _adjoint(jnp.dot(decode(c, codes, s), h, precision=lax.Precision.HIGHEST), codes, s, k)

    def cg(c, s):
        ridge = 1e-8 * jnp.mean(jnp.diagonal(h))
        b = _adjoint(wh, codes, s, k)
        r = b - op(c, s) - ridge * c
        p, rr = r, jnp.sum(r * r)

        def step(carry, _):
            c, r, p, rr = carry
            ap = op(p, s) + ridge * p
            alpha = rr / jnp.maximum(jnp.sum(p * ap), 1e-30)
            c, r = c + alpha * p, r - alpha * ap
            rr_new = jnp.sum(r * r)
            p = r + (rr_new / jnp.maximum(rr, 1e-30)) * p
            return (c, r, p, rr_new), None

        (c, _, _, _), _ = lax.scan(step, (c, r, p, rr), None, length=iters)
        return c

    codebooks = cg(codebooks, scales)
    v = decode(codebooks, codes, jnp.ones_like(scales))
    vh = jnp.dot(v, h, precision=lax.Precision.HIGHEST)
    scales = jnp.sum(wh * v, -1) / jnp.maximum(jnp.sum(vh * v, -1), 1e-30)
    return cg(codebooks, scales), scales


def _f16(x):
    return x.astype(jnp.float16).astype(jnp.float32)


def compress_weight(
    key,
    w,
    hessian,
    *,
    bits: int,
    group_size: int,
    codebook_bits: int,
    num_codebooks: int,
    beam: int,
    rounds: int,
    refit_iters: int,
    kmeans_iters: int,
    damp: float,
    embedding: bool = False,
    **_,
) -> CompressedWeight:
    """AQLM of one (out, in) weight given its input Hessian (None: identity)."""
    del embedding
    out, n_in = w.shape
    g, k, m = group_size, 2**codebook_bits, num_codebooks
    h, w0, _ = prepare(w, np.eye(n_in) if hessian is None else hessian, damp=damp)
    scales = jnp.asarray(np.sqrt(np.mean(w0.astype(np.float64) ** 2, axis=1)) + 1e-12, jnp.float32)
    wj, hj = jnp.asarray(w0), jnp.asarray(h / np.mean(np.diag(h)), jnp.float32)
    residual = (wj / scales[:, None]).reshape(-1, g)  # (out * G, g), row-major
    group_weight = np.diag(h).reshape(-1, g).mean(axis=1)  # (G,)
    weights = (np.asarray(scales, np.float64)[:, None] ** 2 * group_weight[None, :]).reshape(-1)
    weights = jnp.asarray(weights / weights.mean(), jnp.float32)
    codebooks, codes = [], []
    for i in range(m):  # residual k-means
        cb = fit_centroids(jax.random.fold_in(key, i), residual, weights, k, kmeans_iters, 64)
        c = encode(cb, residual)
        centroids = cb.centroids
        residual = residual - centroids[c]
        codebooks.append(centroids)
        codes.append(c.reshape(out, n_in // g))
    codebooks, codes = _f16(jnp.stack(codebooks)), jnp.stack(codes)
    scales = _f16(scales)
    for _ in range(rounds):
        codes = beam_search(wj, hj, codebooks, scales, codes, beam=beam)
        if refit_iters:
            codebooks, scales = refit(codebooks, scales, codes, wj, hj, iters=refit_iters)
            codebooks, scales = _f16(codebooks), _f16(scales)
    part = coded_part("aq", codes, codebooks, scales, bits=codebook_bits, shape=w.shape)
    return CompressedWeight((part,))
