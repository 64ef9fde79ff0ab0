"""`vqlib.llm.load(path)`: a Llama-family model from a GGUF file or a Hugging Face folder, no torch.

GGUF (read with the `gguf` package): every tensor is dequantised to float32 numpy (`gguf.quants`),
so a quantised file gives the model its dequantised values. llama.cpp's converter stores the
rows of q and k permuted for its interleaved RoPE (pairs (2i, 2i+1)); they are permuted back to
Hugging Face's "rotate half" layout (pairs (i, i + hd/2)). The tokenizer is rebuilt from the
file's vocabulary and merges by transformers' GGUF tokenizer converter.

Hugging Face folder: config.json (transformers' AutoConfig), *.safetensors (safetensors, any
float dtype), and the tokenizer files (transformers' AutoTokenizer, fast tokenizers only).
A `.vq` file written by `vqlib.save` is read by `vqlib.load`; `load` accepts it too.
"""

from __future__ import annotations

import glob
import json
import os

import jax.numpy as jnp
import numpy as np

from vqlib.llm._config import LlamaConfig
from vqlib.llm._model import Block, Model, Params, check_params, tokenizer_bytes

ARCHITECTURES = ("llama",)


def _transformers():
    """transformers, imported without its advice that PyTorch is missing (vqlib never needs torch)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers

    return transformers


def _refuse(path, arch) -> ValueError:
    return ValueError(
        f"{path}: architecture {arch!r} is not supported; vqlib.llm reads Llama-family decoders "
        f"(architecture {ARCHITECTURES[0]!r}: RMSNorm, RoPE, grouped-query attention, SwiGLU)"
    )


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: (heads, hd/2, 2, in) -> (heads, 2, hd/2, in)."""
    out, n_in = w.shape
    return w.reshape(heads, out // heads // 2, 2, n_in).swapaxes(1, 2).reshape(out, n_in)


# ----------------------------------------------------------------------------- GGUF


def _field(reader, name, default=None):
    f = reader.fields.get(name)
    return default if f is None else f.contents()


def _float32(value) -> float:
    """A float32 header value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _gguf_tokenizer(reader, path):
    _transformers()
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    if _field(reader, "tokenizer.ggml.tokens") is None:
        raise ValueError(f"{path} has no tokenizer (no tokenizer.ggml.tokens); use a GGUF file that embeds one")
    found = {}
    for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items():
        value = _field(reader, f"tokenizer.{key}")
        if value is not None:
            found[name] = value
    try:
        tok, _ = convert_gguf_tokenizer(_field(reader, "general.architecture"), found)
    except ValueError as e:
        raise ValueError(f"{path}: cannot build its tokenizer: {e}") from None
    return tok


def load_gguf(path: str) -> Model:
    """A Llama-family model from a GGUF file, every tensor dequantised to float32."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # gguf raises assorted errors on damaged files
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupted?): {e}") from None
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise _refuse(path, arch)
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{path}: RoPE scaling {scaling!r} is not supported; only unscaled RoPE is implemented")
    tensors = {t.name: t for t in reader.tensors}

    def tensor(name):
        if name not in tensors:
            raise ValueError(f"{path} has no tensor {name!r}; is it a complete {arch} model?")
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        return w.reshape([int(s) for s in reversed(t.shape)])

    heads = int(_field(reader, f"{arch}.attention.head_count"))
    dim = int(_field(reader, f"{arch}.embedding_length"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    embed = tensor("token_embd.weight")
    config = LlamaConfig(
        vocab_size=embed.shape[0],
        dim=dim,
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(_field(reader, f"{arch}.attention.key_length", dim // heads)),
        hidden_dim=int(_field(reader, f"{arch}.feed_forward_length")),
        rope_theta=_float32(_field(reader, f"{arch}.rope.freq_base", 10_000.0)),
        norm_eps=_float32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors,
        max_position=int(_field(reader, f"{arch}.context_length", 2048)),
    )
    blocks = []
    for i in range(config.num_layers):
        p = f"blk.{i}."
        blocks.append(
            Block(
                attn_norm=tensor(p + "attn_norm.weight"),
                wq=_unpermute(tensor(p + "attn_q.weight"), heads),
                wk=_unpermute(tensor(p + "attn_k.weight"), kv_heads),
                wv=tensor(p + "attn_v.weight"),
                wo=tensor(p + "attn_output.weight"),
                mlp_norm=tensor(p + "ffn_norm.weight"),
                w_gate=tensor(p + "ffn_gate.weight"),
                w_up=tensor(p + "ffn_up.weight"),
                w_down=tensor(p + "ffn_down.weight"),
            )
        )
    params = Params(
        embed=embed,
        blocks=tuple(blocks),
        final_norm=tensor("output_norm.weight"),
        lm_head=None if config.tie_embeddings else tensor("output.weight"),
    )
    check_params(params, config)
    tok = _gguf_tokenizer(reader, path)
    info = (("source", os.path.basename(path)), ("format", "gguf"), ("name", str(_field(reader, "general.name", ""))))
    return Model(config, _to_jax(params), tokenizer_bytes(tok), info)


# ----------------------------------------------------------------------------- Hugging Face folder


def _hf_config(folder: str) -> LlamaConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no config.json; a Hugging Face model folder needs one")
    with open(path) as f:
        arch = json.load(f).get("model_type")
    if arch not in ARCHITECTURES:
        raise _refuse(folder, arch)
    cfg = _transformers().AutoConfig.from_pretrained(folder, local_files_only=True)
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"{folder}: RoPE scaling {rope_type!r} is not supported; only unscaled RoPE is implemented")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError(f"{folder}: linear biases (attention_bias / mlp_bias) are not supported")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"{folder}: hidden_act {cfg.hidden_act!r} is not supported; the MLP is SwiGLU (silu)")
    heads = cfg.num_attention_heads
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        dim=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        hidden_dim=cfg.intermediate_size,
        rope_theta=float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10_000.0))),
        norm_eps=float(cfg.rms_norm_eps),
        tie_embeddings=bool(cfg.tie_word_embeddings),
        max_position=int(cfg.max_position_embeddings),
    )


def _hf_tokenizer(folder: str):
    names = ("tokenizer.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(folder, n)) for n in names):
        raise ValueError(
            f"{folder} has no tokenizer (none of {', '.join(names)}); copy the model's tokenizer files into it"
        )
    tok = _transformers().AutoTokenizer.from_pretrained(folder, local_files_only=True)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{folder}: the tokenizer is not a fast (tokenizers) tokenizer; add a tokenizer.json")
    return backend


def load_hf(folder: str) -> Model:
    """A Llama-family model from a Hugging Face folder (config.json, *.safetensors, tokenizer files)."""
    from safetensors import safe_open

    config = _hf_config(folder)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"{folder} has no *.safetensors weights (torch .bin checkpoints are not read)")
    tensors = {}
    for file in files:
        with safe_open(file, framework="flax") as f:  # jax arrays: bfloat16 included
            for name in f.keys():
                tensors[name] = f.get_tensor(name)

    def tensor(name):
        if name not in tensors:
            raise ValueError(f"{folder}: no tensor {name!r} in {', '.join(map(os.path.basename, files))}")
        return np.asarray(tensors[name].astype(jnp.float32))

    blocks = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        blocks.append(
            Block(
                attn_norm=tensor(p + "input_layernorm.weight"),
                wq=tensor(p + "self_attn.q_proj.weight"),
                wk=tensor(p + "self_attn.k_proj.weight"),
                wv=tensor(p + "self_attn.v_proj.weight"),
                wo=tensor(p + "self_attn.o_proj.weight"),
                mlp_norm=tensor(p + "post_attention_layernorm.weight"),
                w_gate=tensor(p + "mlp.gate_proj.weight"),
                w_up=tensor(p + "mlp.up_proj.weight"),
                w_down=tensor(p + "mlp.down_proj.weight"),
            )
        )
    tied = config.tie_embeddings or "lm_head.weight" not in tensors
    params = Params(
        embed=tensor("model.embed_tokens.weight"),
        blocks=tuple(blocks),
        final_norm=tensor("model.norm.weight"),
        lm_head=None if tied else tensor("lm_head.weight"),
    )
    if tied and not config.tie_embeddings:
        config = LlamaConfig(**{**_fields(config), "tie_embeddings": True})
    check_params(params, config)
    tok = _hf_tokenizer(folder)
    info = (("source", os.path.basename(os.path.normpath(folder))), ("format", "huggingface"))
    return Model(config, _to_jax(params), tokenizer_bytes(tok), info)


def _fields(config: LlamaConfig) -> dict:
    import dataclasses

    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _to_jax(params: Params) -> Params:
    import jax

    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def load(path) -> Model:
    """Loads a Llama-family model: a GGUF file, a Hugging Face folder, or a `.vq` file from `vqlib.save`.

    Args:
        path: `model.gguf`, a folder with config.json + *.safetensors + tokenizer files, or
            a compressed model saved with `vqlib.save`.

    Returns:
        A `Model` (config, params, tokenizer). Weights are float32 (GGUF quantised tensors are
        dequantised); a `.vq` file keeps its compressed weights.

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: an architecture other than Llama, a missing tokenizer or tensor, a damaged file.

    Example:
        >>> import vqlib.llm
        >>> vqlib.llm.load("missing.gguf")
        Traceback (most recent call last):
        ...
        FileNotFoundError: missing.gguf: no such file or folder
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return load_hf(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return load_gguf(path)
    from vqlib._io import load as load_file

    obj = load_file(path)  # raises ValueError for anything that is not a vqlib file
    if not isinstance(obj, Model):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a vqlib.llm Model")
    return obj
