"""ANN indexes built from any registered codebook: Flat, IVF-Flat, IVF-PQ (OPQ), fast-scan,
IVF-RVQ / AQ, TurboQuant, RaBitQ, ...

`build` / `add` / `delete` / `compact` return new immutable indexes; `search` is jit-compiled
and batched over queries; `shard` splits an index over a device mesh; `vqlib.save` /
`vqlib.load` store an Index in the common format.
"""

from vqlib.retrieval._faiss import from_faiss as from_faiss
from vqlib.retrieval._faiss import to_faiss as to_faiss
from vqlib.retrieval._index import KINDS as KINDS
from vqlib.retrieval._index import Index as Index
from vqlib.retrieval._index import add as add
from vqlib.retrieval._index import build as build
from vqlib.retrieval._index import bytes_per_vector as bytes_per_vector
from vqlib.retrieval._index import compact as compact
from vqlib.retrieval._index import delete as delete
from vqlib.retrieval._search import search as search
from vqlib.retrieval._shard import ShardedIndex as ShardedIndex
from vqlib.retrieval._shard import shard as shard
