"""LlamaConfig: the shape and constants of a Llama-family decoder (a leafless, savable pytree)."""

from __future__ import annotations

from vqlib import _checks
from vqlib._types import pytree_dataclass, static_field


@pytree_dataclass
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder; every field is static (hashable, a jit cache key).

    Attributes:
        vocab_size: rows of the token embedding.
        dim: width of the residual stream (Hugging Face `hidden_size`).
        num_layers: transformer blocks.
        num_heads: query heads; `num_heads * head_dim` is the width of q.
        num_kv_heads: key/value heads (grouped-query attention); divides `num_heads`.
        head_dim: width of one head (even: RoPE rotates pairs).
        hidden_dim: width of the SwiGLU MLP (Hugging Face `intermediate_size`).
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: the output head is the token embedding (no separate `lm_head`).
        max_position: the context length the model was trained for (informational).
    """

    vocab_size: int = static_field()
    dim: int = static_field()
    num_layers: int = static_field()
    num_heads: int = static_field()
    num_kv_heads: int = static_field()
    head_dim: int = static_field()
    hidden_dim: int = static_field()
    rope_theta: float = static_field(10_000.0)
    norm_eps: float = static_field(1e-5)
    tie_embeddings: bool = static_field(False)
    max_position: int = static_field(2048)

    def __post_init__(self):
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_dim"):
            _checks.check_int(getattr(self, name), name, low=1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                "grouped-query attention shares each key/value head among num_heads // num_kv_heads query heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even: RoPE rotates pairs of coordinates")

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim
