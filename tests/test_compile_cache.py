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


def test_the_default_cache_yields_to_the_users_choice(tmp_path):
    assert _run({"VQLIB_COMPILATION_CACHE": str(tmp_path / "mine")})["dir"] == str(tmp_path / "mine")
    assert _run({"VQLIB_COMPILATION_CACHE": "off"})["dir"] is None
    theirs = str(tmp_path / "theirs")
    assert _run({"JAX_COMPILATION_CACHE_DIR": theirs})["dir"] == theirs  # JAX's own setting wins
    assert _run({"XDG_CACHE_HOME": str(tmp_path / "xdg")})["dir"] == str(tmp_path / "xdg" / "vqlib" / "jax")
