"""QuIP#: randomized Hadamard incoherence, the E8P lattice codebook, and LDLQ rounding.

1. Incoherence: random orthogonal R_in (size in) and R_out (size out), each a randomized
   Hadamard transform (`vqlib.codebooks.random_rotation`: random signs, fast Walsh-Hadamard,
   a small Haar factor on the odd part of the size); W~ = R_out W R_in^T and H~ = R_in H R_in^T.
   Rotated weights look Gaussian, which is what a lattice codebook wants.
2. W~ is divided by step = RMS(W~) / rms_scale and coded 8 columns at a time by E8P (QuIP#'s
   2-bit codebook of 65,536 points of E8 + 1/4, `vqlib.codebooks` E8P, exact nearest point);
   3 bits add a second stage on the residual times 2.04 coded by E81B (the 256 smallest points
   of E8, 1 bit per weight), 4 bits a second E8P stage on the residual times 3.45 (QuIP#'s RVQ);
   5 and 6 bits continue the chain (E8P, E8P, then E81B or E8P): each E8P stage leaves a
   residual 3.45 times smaller than its input, whatever came before (the code is scale-free),
   so a stage after it takes the same gain as the second stage does.
3. Rounding is block LDLQ (`_gptq.py` with 8-column chunks): each 8-column block is rounded to
   the lattice after the errors of the blocks before it were fed forward through U = chol(H~^-1).

Inference: y = unrotate(R_out, sum_stages lut_matmul(rotate(R_in, x), stage)); a tied embedding
gets no R_out (an embedding row must decode on its own).

4. Row gains: with the codes fixed, each row's scale is set to the least-output-error gain
   <W~_i H~, v_i> / <v_i H~, v_i> of its decoded row v_i (one float16 per row and stage: 16 / in
   bits per weight, where QuIP# keeps one scale per matrix).

Stored: 16-bit codes per 8 weights per E8P stage (8-bit for E81B), float16 row scales per stage,
and each rotation's sign bits plus its small Kronecker factor (float32).
Not done here: QuIP#'s fine-tuning of the remaining float parameters and its 10 extra LDLQ passes.

References:
    Tseng, Chee, Sun, Kuleshov & De Sa, "QuIP#: even better LLM quantization with Hadamard
    incoherence and lattice codebooks", ICML 2024 (arXiv 2402.04396).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vqlib import _checks
from vqlib.codebooks import E8Codebook, decode, encode, random_rotation, rotate
from vqlib.llm import _finetune
from vqlib.llm._common import check_known
from vqlib.llm._gptq import prepare, propagate, quantize_group
from vqlib.llm._weights import CompressedWeight, PackedRotation, coded_part

NEEDS_CALIBRATION = True
BITS = (2, 3, 4, 5, 6)
# rms_scale s (step = RMS / s) per bit width: QuIP#'s code defaults, 0.9 at 2 bits (its README's
# recommendation for LLMs); the residual stage's gain (2.04 for E81B, 3.45 for E8P).
DEFAULT_RMS_SCALE = {2: 0.9, 3: 0.98, 4: 1.03, 5: 1.03, 6: 1.03}
RESIDUAL_GAIN = {"e8": 2.04, "e8p": 3.45}  # a stage's step: the previous stage's over this
# stages per bit width after the first E8P stage (2 bits each for E8P, 1 for E81B)
RESIDUAL_STAGES = {2: (), 3: ("e8",), 4: ("e8p",), 5: ("e8p", "e8"), 6: ("e8p", "e8p")}
OPTIONS = ("rms_scale", "damp", "block_cols", *_finetune.OPTIONS)


def check_options(bits, options: dict) -> dict:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(
            "quip codes bits=2 (E8P), 3 (E8P + E81B residual), 4 (E8P + E8P residual), 5 (E8P + E8P + E81B) "
            f"or 6 (E8P x 3), got bits={bits!r}"
        )
    check_known(options, OPTIONS, "quip")
    scale = _checks.check_nonnegative_float(options.get("rms_scale", DEFAULT_RMS_SCALE[bits]), "rms_scale")
    if scale == 0:
        raise ValueError("rms_scale must be > 0 (QuIP#: 0.9 to 1.03)")
    return dict(
        bits=bits,
        rms_scale=scale,
        damp=_checks.check_nonnegative_float(options.get("damp", 0.01), "damp"),
        block_cols=_checks.check_int(options.get("block_cols", 128), "block_cols", low=8),
        **_finetune.check_options(options),
    )


def check_shape(name: str, shape, **_) -> None:
    if shape[1] % 8:
        raise ValueError(f"{name} has {shape[1]} input columns; E8P codes blocks of 8, so in must be a multiple of 8")


def _stages(bits: int, step):
    """The E8 codebooks (8 coordinates, no rotation) of the stages, steps in weight units."""
    stages = [E8Codebook(step, None, 8, 2, "e8p")]
    for kind in RESIDUAL_STAGES[bits]:
        step = step / jnp.float32(RESIDUAL_GAIN[kind])
        stages.append(E8Codebook(step, None, 8, 2 if kind == "e8p" else 1, kind))
    return tuple(stages)


def _lattice_chunk(x, a, k, stages):
    """Nearest-point rounding of 8 columns (out, 8), stage after stage (LDLQ ignores the metric a)."""
    del a, k
    q, codes = jnp.zeros_like(x), []
    for cb in stages:
        c = encode(cb, x - q)  # (out, 1)
        q = q + decode(cb, c)
        codes.append(c[:, 0])
    return q, jnp.stack(codes)  # (stages, out)


@jax.jit
def _row_scales(stages, codes, w, h):
    """Per-row gains r_i = <W_i H, v_i> / <v_i H, v_i> of the decoded rows v (least output error)."""
    out = w.shape[0]
    v = sum(decode(cb, c.reshape(-1, 1)).reshape(out, -1) for cb, c in zip(stages, codes, strict=True))
    vh = jnp.dot(v, h, precision=jax.lax.Precision.HIGHEST)
    gain = jnp.sum(jnp.dot(w, h, precision=jax.lax.Precision.HIGHEST) * v, -1) / jnp.maximum(jnp.sum(vh * v, -1), 1e-30)
    return jnp.where(jnp.isfinite(gain) & (gain > 0), gain, 1.0).astype(jnp.float32)


def _incoherent(key, w, hessian, *, embedding: bool):
    """QuIP#'s incoherence processing: W~ = R_out W R_in^T and H~ = R_in H R_in^T, each R a
    randomized Hadamard transform (`vqlib.codebooks.random_rotation`); an embedding gets no
    R_out (its rows must decode one at a time). Rotated weights look Gaussian, without the
    outlying entries or the block-wise grid of a checkpoint already quantized.

    Returns:
        (W~ float32 (out, in), H~ float64 (in, in) (the identity for hessian None), R_in, R_out
        or None): the weight y = W x is y = R_out^T W~ R_in x.
    """
    out, n_in = w.shape
    in_key, out_key = jax.random.split(key)
    r_in = random_rotation(in_key, n_in)
    r_out = None if embedding else random_rotation(out_key, out)
    wt = rotate(r_in, jnp.asarray(w, jnp.float32))  # W R_in^T
    if r_out is not None:
        wt = rotate(r_out, wt.T).T  # R_out W R_in^T
    h = np.eye(n_in) if hessian is None else np.asarray(hessian, np.float64)
    h = h / np.mean(np.diag(h)) if np.mean(np.diag(h)) > 0 else h
    ht = np.asarray(rotate(r_in, rotate(r_in, jnp.asarray(h, jnp.float32)).T).T, np.float64)  # R_in H R_in^T
    return np.asarray(wt), (ht + ht.T) / 2, r_in, r_out


def _block_cols(n_in: int, target: int) -> int:
    return max(c for c in range(8, min(target, n_in) + 1, 8) if n_in % c == 0)


def compress_weight(
    key, w, hessian, *, bits: int, rms_scale: float, damp: float, block_cols: int, embedding=False, **_
):
    """QuIP# of one (out, in) weight given its input Hessian (None: identity)."""
    out, n_in = w.shape
    wt, ht, r_in, r_out = _incoherent(key, w, hessian, embedding=embedding)
    h_damped, wt0, u = prepare(wt, ht, damp=damp)
    step = jnp.float32(np.float16(np.sqrt(np.mean(wt0.astype(np.float64) ** 2)) / rms_scale))
    stages = _stages(bits, step)
    stages = tuple(E8Codebook(jnp.float32(np.float16(cb.step)), None, 8, cb.bits, cb.kind) for cb in stages)
    c = _block_cols(n_in, block_cols)
    uj, wj = jnp.asarray(u, jnp.float32), jnp.asarray(wt0)
    codes = []
    for g in range(n_in // c):
        cols = slice(g * c, (g + 1) * c)
        _, group_codes, e = quantize_group(wj[:, cols], uj[cols, cols], stages, quantize=_lattice_chunk, d=8)
        if (g + 1) * c < n_in:
            wj = wj.at[:, (g + 1) * c :].set(propagate(wj[:, (g + 1) * c :], e, uj[cols, (g + 1) * c :]))
        codes.append(jnp.moveaxis(group_codes, 0, 2))  # (stages, out, c / 8)
    codes = jnp.concatenate(codes, axis=2)  # (stages, out, in / 8)
    rows = _row_scales(stages, codes, jnp.asarray(wt0), jnp.asarray(h_damped, jnp.float32))
    parts = tuple(
        coded_part(cb.kind, codes[i][None], None, cb.step * rows, bits=8 * cb.bits, shape=(out, n_in))
        for i, cb in enumerate(stages)
    )
    return CompressedWeight(
        parts,
        rotation_in=PackedRotation.of(r_in),
        rotation_out=None if r_out is None else PackedRotation.of(r_out),
    )
