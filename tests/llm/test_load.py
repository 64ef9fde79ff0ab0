"""Loading: Hugging Face folders and GGUF files written here, against the numpy reference."""

import json
import os

import jax.numpy as jnp
import llm_reference as reference
import numpy as np
import pytest

import vqlib
import vqlib.llm
from vqlib.llm import forward, load

pytest.importorskip("gguf")
pytest.importorskip("transformers")

SHAPE = dict(reference.TINY, vocab_size=320)


@pytest.fixture(scope="module")
def tokenizer():
    return reference.train_tokenizer(SHAPE["vocab_size"])


def _check_logits(model, weights):
    tokens = np.array([3, 77, 5, 120, 9, 250, 1])
    logits, _ = forward(model.params, model.config, jnp.asarray(tokens[None], jnp.int32))
    want = reference.forward(weights, tokens, num_heads=4, num_kv_heads=2, head_dim=8)
    np.testing.assert_allclose(np.asarray(logits[0]), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_hf_folder(tmp_path, tokenizer, tied):
    weights = reference.random_weights(0, tied=tied, **SHAPE)
    reference.write_hf_folder(str(tmp_path), weights, SHAPE, tokenizer=tokenizer)
    model = load(tmp_path)
    assert model.config.tie_embeddings == tied and model.config.num_kv_heads == 2
    np.testing.assert_array_equal(model.params.blocks[1].wk, weights["blocks"][1]["wk"])
    _check_logits(model, weights)
    text = "The quick brown fox"
    assert vqlib.llm.encode_text(model, text).tolist() == tokenizer.encode(text).ids


def test_gguf_unpermutes_q_and_k(tmp_path, tokenizer):
    weights = reference.random_weights(1, tied=True, **SHAPE)
    path = str(tmp_path / "tiny.gguf")
    reference.write_gguf(path, weights, SHAPE, tokenizer=tokenizer)
    model = load(path)
    for name in ("wq", "wk", "wv"):
        np.testing.assert_array_equal(model.params.blocks[0].__getattribute__(name), weights["blocks"][0][name])
    _check_logits(model, weights)
    text = "Perplexity of language"
    assert vqlib.llm.encode_text(model, text).tolist() == tokenizer.encode(text).ids


def test_gguf_and_hf_give_the_same_model(tmp_path, tokenizer):
    weights = reference.random_weights(2, tied=False, **SHAPE)
    reference.write_gguf(str(tmp_path / "m.gguf"), weights, SHAPE, tokenizer=tokenizer)
    reference.write_hf_folder(str(tmp_path / "hf"), weights, SHAPE, tokenizer=tokenizer)
    a, b = load(tmp_path / "m.gguf"), load(tmp_path / "hf")
    assert a.config == b.config
    for x, y in zip(vqlib_leaves(a.params), vqlib_leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)


def vqlib_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_saved_model_loads_back(tmp_path, tokenizer):
    weights = reference.random_weights(3, tied=True, **SHAPE)
    reference.write_hf_folder(str(tmp_path / "hf"), weights, SHAPE, tokenizer=tokenizer)
    model = load(tmp_path / "hf")
    vqlib.save(tmp_path / "m.vq", model)
    back = load(tmp_path / "m.vq")
    assert back.config == model.config and back.info == model.info
    _check_logits(back, weights)
    assert vqlib.llm.encode_text(back, "lazy dog").tolist() == tokenizer.encode("lazy dog").ids


def test_refuses_other_architectures(tmp_path, tokenizer):
    weights = reference.random_weights(4, tied=True, **SHAPE)
    reference.write_hf_folder(str(tmp_path / "hf"), weights, SHAPE, tokenizer=tokenizer, model_type="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        load(tmp_path / "hf")
    reference.write_gguf(str(tmp_path / "m.gguf"), weights, SHAPE, tokenizer=tokenizer, arch="falcon")
    with pytest.raises(ValueError, match="architecture 'falcon' is not supported"):
        load(tmp_path / "m.gguf")


def test_missing_tokenizer_and_files(tmp_path, tokenizer):
    weights = reference.random_weights(5, tied=True, **SHAPE)
    reference.write_hf_folder(str(tmp_path / "hf"), weights, SHAPE, tokenizer=None)
    with pytest.raises(ValueError, match="has no tokenizer"):
        load(tmp_path / "hf")
    reference.write_gguf(str(tmp_path / "m.gguf"), weights, SHAPE, tokenizer=None)
    with pytest.raises(ValueError, match="has no tokenizer"):
        load(tmp_path / "m.gguf")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "absent.gguf")
    os.remove(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        load(tmp_path / "hf")


def test_truncated_gguf_and_foreign_files(tmp_path, tokenizer):
    weights = reference.random_weights(6, tied=True, **SHAPE)
    path = tmp_path / "m.gguf"
    reference.write_gguf(str(path), weights, SHAPE, tokenizer=tokenizer)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="GGUF"):
        load(path)
    other = tmp_path / "notes.json"
    other.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError):
        load(other)
