"""An independent float64 numpy Llama forward (Hugging Face's LlamaForCausalLM equations), tiny
random models, and writers for Hugging Face folders and GGUF files, for the llm tests."""

from __future__ import annotations

import json
import os

import numpy as np

NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
HF = dict(wq="self_attn.q_proj", wk="self_attn.k_proj", wv="self_attn.v_proj", wo="self_attn.o_proj")
HF |= dict(w_gate="mlp.gate_proj", w_up="mlp.up_proj", w_down="mlp.down_proj")
GGUF = dict(wq="attn_q", wk="attn_k", wv="attn_v", wo="attn_output", w_gate="ffn_gate", w_up="ffn_up")
GGUF |= dict(w_down="ffn_down")
TINY = dict(vocab_size=300, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, hidden_dim=48)


def random_weights(seed: int, *, vocab_size, dim, num_layers, num_heads, num_kv_heads, head_dim, hidden_dim, tied):
    """A dict of float32 numpy weights in (out, in) layout, names as in vqlib.llm.Block."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return (0.08 * rng.normal(size=shape)).astype(np.float32)

    def gain():
        return (1 + 0.1 * rng.normal(size=dim)).astype(np.float32)

    q, kv = num_heads * head_dim, num_kv_heads * head_dim
    blocks = []
    for _ in range(num_layers):
        blocks.append(
            dict(
                attn_norm=gain(),
                wq=normal(q, dim),
                wk=normal(kv, dim),
                wv=normal(kv, dim),
                wo=normal(dim, q),
                mlp_norm=gain(),
                w_gate=normal(hidden_dim, dim),
                w_up=normal(hidden_dim, dim),
                w_down=normal(dim, hidden_dim),
            )
        )
    embed = normal(vocab_size, dim)
    return dict(embed=embed, blocks=blocks, final_norm=gain(), lm_head=None if tied else normal(vocab_size, dim))


def forward(weights: dict, tokens, *, num_heads, num_kv_heads, head_dim, rope_theta=10_000.0, eps=1e-5) -> np.ndarray:
    """Logits (t, vocab) in float64 for one sequence of token ids, written from HF's equations."""
    f64 = {k: v for k, v in weights.items()}
    x = np.asarray(f64["embed"], np.float64)[np.asarray(tokens)]
    t = len(tokens)
    inv = 1.0 / rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
    ang = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def norm(v, g):
        return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + eps) * g

    def rope(v):  # (t, heads, hd)
        half = head_dim // 2
        rot = np.concatenate([-v[..., half:], v[..., :half]], -1)
        return v * cos[:, None] + rot * sin[:, None]

    group = num_heads // num_kv_heads
    mask = np.tril(np.ones((t, t), bool))
    for blk in f64["blocks"]:
        b = {k: np.asarray(v, np.float64) for k, v in blk.items()}
        a = norm(x, b["attn_norm"])
        q = rope((a @ b["wq"].T).reshape(t, num_heads, head_dim))
        k = rope((a @ b["wk"].T).reshape(t, num_kv_heads, head_dim))
        v = (a @ b["wv"].T).reshape(t, num_kv_heads, head_dim)
        out = np.zeros((t, num_heads, head_dim))
        for hd in range(num_heads):
            s = q[:, hd] @ k[:, hd // group].T / np.sqrt(head_dim)
            s = np.where(mask, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[:, hd] = (p / p.sum(-1, keepdims=True)) @ v[:, hd // group]
        x = x + out.reshape(t, -1) @ b["wo"].T
        m = norm(x, b["mlp_norm"])
        g = m @ b["w_gate"].T
        x = x + ((g / (1 + np.exp(-g))) * (m @ b["w_up"].T)) @ b["w_down"].T
    head = f64["embed"] if f64["lm_head"] is None else f64["lm_head"]
    return norm(x, np.asarray(f64["final_norm"], np.float64)) @ np.asarray(head, np.float64).T


def train_tokenizer(vocab_size: int):
    """A small byte-level BPE tokenizer (tokenizers), trained on a fixed English text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = ["The quick brown fox jumps over the lazy dog. " * 3, "Perplexity of language models on text. " * 3]
    tok.train_from_iterator(text * 20, trainer=trainer)
    return tok


def write_hf_folder(folder: str, weights: dict, config: dict, *, tokenizer=None, model_type: str = "llama") -> None:
    """config.json, model.safetensors and (when given) the tokenizer files of a Llama checkpoint."""
    import safetensors.numpy

    os.makedirs(folder, exist_ok=True)
    hf = dict(
        model_type=model_type,
        architectures=["LlamaForCausalLM"],
        vocab_size=config["vocab_size"],
        hidden_size=config["dim"],
        intermediate_size=config["hidden_dim"],
        num_hidden_layers=config["num_layers"],
        num_attention_heads=config["num_heads"],
        num_key_value_heads=config["num_kv_heads"],
        head_dim=config["head_dim"],
        rms_norm_eps=1e-5,
        rope_theta=config.get("rope_theta", 10_000.0),
        tie_word_embeddings=weights["lm_head"] is None,
        max_position_embeddings=256,
        hidden_act="silu",
    )
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f)
    tensors = {"model.embed_tokens.weight": weights["embed"], "model.norm.weight": weights["final_norm"]}
    if weights["lm_head"] is not None:
        tensors["lm_head.weight"] = weights["lm_head"]
    for i, blk in enumerate(weights["blocks"]):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = blk["attn_norm"]
        tensors[p + "post_attention_layernorm.weight"] = blk["mlp_norm"]
        for name in NAMES:
            tensors[p + HF[name] + ".weight"] = blk[name]
    safetensors.numpy.save_file(tensors, os.path.join(folder, "model.safetensors"))
    if tokenizer is not None:
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(folder)


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row permutation (HF "rotate half" -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: str, weights: dict, config: dict, *, tokenizer=None, arch: str = "llama") -> None:
    """A float32 GGUF file as llama.cpp's converter writes it (q/k rows permuted)."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(config["num_layers"])
    w.add_context_length(256)
    w.add_embedding_length(config["dim"])
    w.add_feed_forward_length(config["hidden_dim"])
    w.add_head_count(config["num_heads"])
    w.add_head_count_kv(config["num_kv_heads"])
    w.add_rope_freq_base(config.get("rope_theta", 10_000.0))
    w.add_layer_norm_rms_eps(1e-5)
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        model = json.loads(tokenizer.to_str())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_tensor("token_embd.weight", weights["embed"])
    w.add_tensor("output_norm.weight", weights["final_norm"])
    if weights["lm_head"] is not None:
        w.add_tensor("output.weight", weights["lm_head"])
    for i, blk in enumerate(weights["blocks"]):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", blk["attn_norm"])
        w.add_tensor(p + "ffn_norm.weight", blk["mlp_norm"])
        for name in NAMES:
            t = blk[name]
            if name == "wq":
                t = llama_cpp_permute(t, config["num_heads"])
            elif name == "wk":
                t = llama_cpp_permute(t, config["num_kv_heads"])
            w.add_tensor(p + GGUF[name] + ".weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
