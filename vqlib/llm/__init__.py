"""LLMs: a Llama-family decoder in JAX, GGUF / Hugging Face loading, perplexity and generation,
post-training weight compressors (RTN, GPTVQ, AQLM, QuIP#) whose weights run through
`vqlib.kernels.lut_matmul`, `distill` (their end-to-end fine-tuning against the float model),
and compressed KV caches (`make_cache`: KIVI, KVQuant-style, TurboQuant, PQ) that
`perplexity(..., kv_cache=)` and `generate(..., kv_cache=)` take."""

from vqlib.llm._compress import bits_per_weight as bits_per_weight
from vqlib.llm._compress import compress as compress
from vqlib.llm._compress import decompress as decompress
from vqlib.llm._config import LlamaConfig as LlamaConfig
from vqlib.llm._distill import distill as distill
from vqlib.llm._eval import read_text as read_text
from vqlib.llm._eval_cache import perplexity as perplexity
from vqlib.llm._generate import generate as generate
from vqlib.llm._kv_cache import FloatKVCache as FloatKVCache
from vqlib.llm._kv_cache import KVCache as KVCache
from vqlib.llm._kv_cache import attention as attention
from vqlib.llm._kv_cache import init_float_cache as init_float_cache
from vqlib.llm._kv_make import KVCalibration as KVCalibration
from vqlib.llm._kv_make import cache_storage as cache_storage
from vqlib.llm._kv_make import calibrate as calibrate
from vqlib.llm._kv_make import make_cache as make_cache
from vqlib.llm._load import load as load
from vqlib.llm._model import Block as Block
from vqlib.llm._model import Model as Model
from vqlib.llm._model import Params as Params
from vqlib.llm._model import encode_text as encode_text
from vqlib.llm._model import forward as forward
from vqlib.llm._model import init_params as init_params
from vqlib.llm._model import tokenizer as tokenizer
from vqlib.llm._weights import CodedPart as CodedPart
from vqlib.llm._weights import CompressedWeight as CompressedWeight
from vqlib.llm._weights import PackedRotation as PackedRotation
from vqlib.llm._weights import linear as linear
