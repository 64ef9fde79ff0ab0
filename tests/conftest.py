"""Test settings: strict dtype and rank promotion, a per-test PRNG key, real-data location, compiled
programs released after each module, the heaviest files scheduled first."""

import hashlib
import os
import pathlib

import jax
import pytest

# The tests compile in a clean state: no persistent compilation cache unless a test sets one up.
os.environ.setdefault("VQLIB_COMPILATION_CACHE", "off")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The files that take longest (worker-seconds in a full run on 2 cores, 2026-11-30), heaviest first.
# The test command hands whole files to the two workers (`--dist loadfile`) in collection order
# (`--no-loadscope-reorder` in pyproject's addopts); a heavy file started last would leave one worker
# idle while the other finishes it, so these go first and the many small files fill in at the end.
HEAVY_FIRST = (
    "tests/llm/test_kv_caches.py",
    "tests/test_notebooks.py",
    "tests/test_fuzz.py",
    "tests/retrieval/test_search.py",
    "tests/llm/test_real_checkpoint.py",
    "tests/retrieval/test_index_io.py",
    "tests/codebooks/test_additive.py",
    "tests/codebooks/test_kmeans.py",
    "tests/test_cli.py",
    "tests/codebooks/test_kmeans_scale.py",
    "tests/llm/test_compress.py",
    "tests/test_compose.py",
    "tests/test_wrong_answers.py",
    "tests/test_malformed_files.py",
    "tests/codebooks/test_product.py",
    "tests/kernels/test_assign.py",
    "tests/test_annotations.py",
    "docs/guide/codebooks.md",
    "tests/test_distributed.py",
    "tests/codebooks/test_turboquant.py",
    "README.md",
    "docs/guide/retrieval.md",
)


def pytest_collection_modifyitems(config, items):
    """Tests of the HEAVY_FIRST files first, in that order; the rest keep their collection order."""
    rank = {path: i for i, path in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.fixture
def key(request):
    """A PRNG key seeded from the test id, so every test draws its own reproducible data."""
    seed = int.from_bytes(hashlib.sha256(request.node.nodeid.encode()).digest()[:4], "little")
    return jax.random.key(seed)


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when the real evaluation data is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real evaluation data not found at {SHARED_DATA} (the repository's ../shared/data)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. Every XLA:CPU executable keeps about
    3 memory maps; a pytest-xdist worker that compiles the whole suite's shapes reaches the kernel's
    vm.max_map_count (65,530) and XLA's JIT then dies with SIGSEGV in the next compilation (seen
    at 57% and 82% of a run, in different tests each time). Measured: 300 compilations add 986
    maps, `jax.clear_caches()` gives them back."""
    yield
    jax.clear_caches()
