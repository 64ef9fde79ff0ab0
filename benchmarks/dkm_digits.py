"""Palettising a real model: an MLP on scikit-learn's digits, every kernel at 1, 2 and 3 bits per weight,
by post-training k-means (`vqlib.nn.palettize_kmeans`) and by DKM fine-tuning (`vqlib.nn.DKMPalettizer`).

Data: the 1,797 8x8 digit images that ship with scikit-learn, pixels / 16, a stratified 75/25
train/test split (random_state=0). Model: MLP 64-128-128-10 (ReLU), Adam 1e-3, batch 64, 100 epochs
(train accuracy 100%). DKM: the trained model wrapped in `DKMPalettizer(bits=b)` (centroids start at
each kernel's k-means), fine-tuned 30 epochs with Adam 1e-3, tau = 0.01 (relative to each kernel's
variance), 3 DKM iterations per step; then exported and reloaded, so its accuracy is the compressed
model's. The hyperparameters were fixed before the first run and not tuned on the test set.
Every configuration runs for `--seeds` seeds (model initialisation and batch order); we report the
mean and standard deviation of the test accuracy. Size: the bytes of the exported model's arrays
(b-bit packed codes, a float32 codebook of 2**b values per kernel, float32 biases) and of its
`vqlib.save` file (the same plus a JSON header).

Memory: DKM's value and gradient on one 4096 x 4096 weight, k = 16, 3 iterations, measured in a fresh
process (peak RSS), against autodiff through the plain (untiled) formulas at 2048 x 2048 (that one
grows as n k: about 10 GB at 4096 x 4096, not run).

    python benchmarks/dkm_digits.py            # 5 seeds, memory; writes benchmarks/results/dkm_digits.{json,png}
    python benchmarks/dkm_digits.py --quick    # 1 seed, short training (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import vqlib
from vqlib.testing import process_memory

RESULTS = pathlib.Path(__file__).parent / "results"
BITS = (1, 2, 3)


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, sizes=(64, 128, 128, 10)):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


def digits():
    x, y = load_digits(return_X_y=True)
    return train_test_split((x / 16.0).astype(np.float32), y, test_size=0.25, stratify=y, random_state=0)


@nnx.jit
def train_step(model, opt, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss


@nnx.jit
def predict(model, x):
    return jnp.argmax(model(x), axis=-1)


def train(model, x, y, *, epochs: int, seed: int, lr=1e-3, batch=64):
    """Adam on shuffled minibatches (the last partial batch of each epoch dropped); returns the last
    epoch's mean loss."""
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
    order = np.random.default_rng(seed)
    for _ in range(epochs):
        perm = order.permutation(len(x))
        losses = [
            train_step(model, opt, x[perm[i : i + batch]], y[perm[i : i + batch]])
            for i in range(0, len(x) - batch + 1, batch)
        ]
    return float(np.mean(losses))


def accuracy(model, x, y) -> float:
    return float(np.mean(np.asarray(predict(model, x)) == y))


def sizes(palettized) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.vq")
        vqlib.save(path, palettized)
        file_bytes = os.path.getsize(path)
    return {"array_bytes": sum(a.nbytes for a in jax.tree.leaves(palettized)), "file_bytes": file_bytes}


def run_seed(seed: int, data, *, epochs: int, finetune_epochs: int, tau: float) -> list[dict]:
    x_train, x_test, y_train, y_test = data
    model = MLP(nnx.Rngs(seed))
    start = time.perf_counter()
    loss = train(model, x_train, y_train, epochs=epochs, seed=seed)
    float_bytes = sum(a.nbytes for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rows = [
        {
            "seed": seed,
            "method": "float32",
            "bits": 32,
            "test_accuracy": accuracy(model, x_test, y_test),
            "train_accuracy": accuracy(model, x_train, y_train),
            "train_loss": loss,
            "array_bytes": float_bytes,
            "seconds": time.perf_counter() - start,
        }
    ]
    for bits in BITS:
        start = time.perf_counter()
        ptq = vqlib.nn.palettize_kmeans(model, bits=bits, key=jax.random.key(seed))
        rows.append(
            {
                "seed": seed,
                "method": "k-means (post-training)",
                "bits": bits,
                "test_accuracy": accuracy(vqlib.nn.load_palettized(model, ptq), x_test, y_test),
                **sizes(ptq),
                "seconds": time.perf_counter() - start,
            }
        )
        start = time.perf_counter()
        palettizer = vqlib.nn.DKMPalettizer(nnx.clone(model), bits=bits, tau=tau, key=jax.random.key(seed))
        train(palettizer, x_train, y_train, epochs=finetune_epochs, seed=seed + 1000)
        exported = vqlib.nn.export_palettized(palettizer)
        compressed = vqlib.nn.load_palettized(model, exported)
        palettizer.eval()
        rows.append(
            {
                "seed": seed,
                "method": "DKM fine-tuning",
                "bits": bits,
                "test_accuracy": accuracy(compressed, x_test, y_test),
                "eval_mode_equals_export": bool(
                    np.array_equal(np.asarray(predict(palettizer, x_test)), np.asarray(predict(compressed, x_test)))
                ),
                **sizes(exported),
                "seconds": time.perf_counter() - start,
            }
        )
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds for each (method, bits)."""
    keys = list(dict.fromkeys((r["method"], r["bits"]) for r in rows))
    table = []
    for method, bits in keys:
        group = [r for r in rows if r["method"] == method and r["bits"] == bits]
        acc = np.array([r["test_accuracy"] for r in group]) * 100
        table.append(
            {
                "method": method,
                "bits": bits,
                "accuracy_mean": float(acc.mean()),
                "accuracy_std": float(acc.std()),
                "accuracy_min": float(acc.min()),
                "array_bytes": group[0]["array_bytes"],
                "file_bytes": group[0].get("file_bytes"),
                "seeds": len(group),
            }
        )
    return table


def memory_probe(mode: str, side: int):
    """In this (fresh) process: peak RSS of DKM's value and gradient on a side x side weight,
    k = 16, 3 iterations; `mode` "tiled" (vqlib) or "plain" (autodiff through the formulas)."""

    def plain(w, c, tau=0.01, max_iter=3):
        def attention(c):
            return jax.nn.softmax(-jnp.sum(jnp.square(w[:, None, :] - c[None]), axis=2) / tau, axis=1)

        for _ in range(max_iter):
            a = attention(c)
            c = a.T @ w / jnp.sum(a, axis=0)[:, None]
        return attention(c) @ c

    w = jax.random.normal(jax.random.key(0), (side * side, 1)).block_until_ready()
    c = jnp.linspace(-2.0, 2.0, 16)[:, None]
    rss = process_memory("VmRSS")
    soft = (lambda w, c: vqlib.codebooks.dkm(w, c, tau=0.01, max_iter=3)[0]) if mode == "tiled" else plain
    step = jax.jit(jax.value_and_grad(lambda w, c: jnp.sum(soft(w, c) ** 2), argnums=(0, 1)))
    start = time.perf_counter()
    jax.block_until_ready(step(w, c))
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(step(w, c))
    peak = process_memory("VmHWM")
    result = {"mode": mode, "side": side, "k": 16, "max_iter": 3, "rss_before_gb": rss / 2**30}
    result |= {"peak_rss_gb": peak / 2**30, "seconds_first_call": first, "seconds": time.perf_counter() - start}
    print(json.dumps(result))


def fresh_process_memory(mode: str, side: int) -> dict:
    command = [sys.executable, __file__, "--memory-probe", mode, str(side)]
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(table: list[dict], path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, marker, offset in (("k-means (post-training)", "s--", (6, -12)), ("DKM fine-tuning", "o-", (-14, 8))):
        rows = [r for r in table if r["method"] == method]
        kb = [r["array_bytes"] / 1024 for r in rows]
        acc = [r["accuracy_mean"] for r in rows]
        ax.errorbar(kb, acc, yerr=[r["accuracy_std"] for r in rows], fmt=marker, capsize=3, label=method)
        for r, x, y in zip(rows, kb, acc, strict=True):
            ax.annotate(f"{r['bits']} bit", (x, y), textcoords="offset points", xytext=offset, fontsize=8)
    base = next(r for r in table if r["method"] == "float32")
    ax.errorbar([base["array_bytes"] / 1024], [base["accuracy_mean"]], yerr=[base["accuracy_std"]], fmt="k*", ms=10)
    ax.axhline(base["accuracy_mean"], color="k", lw=0.6, ls=":", label=f"float32 ({base['array_bytes'] / 1024:.0f} KB)")
    ax.axhline(base["accuracy_mean"] - 1.0, color="r", lw=0.6, ls=":", label="float32 - 1 point")
    ax.set_xscale("log")
    ax.set_xlabel("model size, KB (codes + codebooks + float32 biases)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(
        f"MLP on scikit-learn digits, every kernel palettised\n(test accuracy, mean ± std of {base['seeds']} seeds)"
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, short training, no memory probe")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tau", type=float, default=0.01)
    parser.add_argument("--memory-probe", nargs=2, metavar=("MODE", "SIDE"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", help="JSON path; the plot goes beside it (default: results/dkm_digits.json, --quick: a temp dir)"
    )
    args = parser.parse_args()
    if args.memory_probe:
        return memory_probe(args.memory_probe[0], int(args.memory_probe[1]))
    seeds, epochs, finetune_epochs = (1, 20, 5) if args.quick else (args.seeds, 100, 30)
    data = digits()
    rows = []
    start = time.perf_counter()
    for seed in range(seeds):
        rows += run_seed(seed, data, epochs=epochs, finetune_epochs=finetune_epochs, tau=args.tau)
        print(
            f"seed {seed}: "
            + ", ".join(f"{r['method']} {r['bits']}b {100 * r['test_accuracy']:.1f}" for r in rows[-7:])
        )
    experiment_seconds = time.perf_counter() - start
    table = summarize(rows)
    print(f"\n{'method':<25} {'bits':>4} {'test acc % (mean ± std)':>24} {'min':>6} {'arrays, B':>10} {'file, B':>8}")
    for r in table:
        print(
            f"{r['method']:<25} {r['bits']:>4} {r['accuracy_mean']:>15.2f} ± {r['accuracy_std']:<6.2f} "
            f"{r['accuracy_min']:>6.1f} {r['array_bytes']:>10,} {r['file_bytes'] or '':>8}"
        )
    memory = None
    if not args.quick:
        memory = [fresh_process_memory("tiled", 4096), fresh_process_memory("tiled", 2048)]
        memory.append(fresh_process_memory("plain", 2048))
        for m in memory:
            print(
                f"DKM value+grad {m['mode']:<5} {m['side']}x{m['side']} k=16: peak RSS {m['peak_rss_gb']:.2f} GB "
                f"({m['rss_before_gb']:.2f} GB before), {m['seconds']:.1f} s per call"
            )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "jax": jax.__version__,
        "settings": {"seeds": seeds, "epochs": epochs, "finetune_epochs": finetune_epochs, "tau": args.tau},
        "experiment_seconds": experiment_seconds,
        "table": table,
        "rows": rows,
        "memory": memory,
    }
    out = pathlib.Path(args.out or (pathlib.Path(tempfile.gettempdir()) if args.quick else RESULTS) / "dkm_digits.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(table, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
