"""Test settings: strict dtype and rank promotion, a per-test PRNG key, real-data location."""

import hashlib
import pathlib

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


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
