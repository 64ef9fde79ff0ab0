"""JAX's persistent compilation cache: a second process reads vqlib's compiled programs from disk;
the import-time default yields to the user's own choice."""

import json
import os
import subprocess
import sys

SCRIPT = """
import json, sys, jax, numpy as np, vqlib
if len(sys.argv) > 1:
    vqlib.enable_compilation_cache(sys.argv[1], min_compile_seconds=0)
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
x = np.random.default_rng(0).normal(size=(500, 8)).astype("float32")
codes = vqlib.encode(vqlib.fit(x, "kmeans", k=8, max_iter=3), x)
print(json.dumps(dict(dir=jax.config.jax_compilation_cache_dir,
                      hits=events.count("/jax/compilation_cache/cache_hits"),
                      misses=events.count("/jax/compilation_cache/cache_misses"),
                      codes=np.asarray(codes).tolist())))
"""


def _run(env: dict, *args) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("VQLIB_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], env=base | env, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_reads_compiled_programs_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first = _run({"VQLIB_COMPILATION_CACHE": "off"}, str(cache))
    assert first["misses"] > 0 and first["hits"] == 0
    written = sorted(p.name for p in cache.iterdir())
    assert any(name.endswith("-cache") for name in written)
    second = _run({"VQLIB_COMPILATION_CACHE": "off"}, str(cache))
    assert second["hits"] == first["misses"] and second["misses"] == 0  # nothing compiled again
    assert second["codes"] == first["codes"]


def test_the_default_cache_yields_to_the_users_choice(tmp_path, monkeypatch):
    """`import vqlib`'s choice, in this process (whose JAX already decided on its cache at its first
    compilation, so the settings made here change nothing for the other tests; restored anyway)."""
    import jax

    from vqlib import _compile_cache

    before = {name: getattr(jax.config, name) for name in CONFIG}

    def choice(**env):
        for name in ("VQLIB_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        jax.config.update("jax_compilation_cache_dir", None)
        return _compile_cache.enable_by_default()

    try:
        assert choice(VQLIB_COMPILATION_CACHE=str(tmp_path / "mine")) == tmp_path / "mine"
        assert (tmp_path / "mine").is_dir() and jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
        assert choice(VQLIB_COMPILATION_CACHE="off") is None
        assert choice(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "theirs")) is None  # JAX's own setting wins
        assert choice(XDG_CACHE_HOME=str(tmp_path / "xdg")) == tmp_path / "xdg" / "vqlib" / "jax"
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    finally:
        for name, value in before.items():
            jax.config.update(name, value)


CONFIG = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_compilation_cache_max_size",
)
