"""Scale-out across processes: two `jax.distributed` processes on localhost (CPU, 2 devices each,
cross-process collectives by gloo, JAX's CPU default) fit k-means on a row-sharded global array
and search a sharded index; the results equal the single-process ones computed here.

This is what the README's multi-host sentences promise: `jax.distributed.initialize()` in every
process, one global array from the per-process rows (`jax.make_array_from_process_local_data`),
the mesh over `jax.devices()`, and the same `fit` / `shard` / `search` calls everywhere.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import vqlib
import vqlib.retrieval

_WORKER = """
    import json, sys, traceback
    import numpy as np
    import jax

    port, process = int(sys.argv[1]), int(sys.argv[2])
    try:
        jax.distributed.initialize(
            coordinator_address=f"localhost:{port}", num_processes=2, process_id=process, initialization_timeout=120
        )
    except Exception as e:
        print("INIT_FAILED " + json.dumps(f"{type(e).__name__}: {e}"))
        sys.exit(0)

    import vqlib, vqlib.retrieval
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sys.path.insert(0, sys.argv[3])
    from test_distributed import CASES, problem

    x, queries = problem()
    out = {"process": process, "devices": jax.device_count(), "local_devices": jax.local_device_count()}
    mesh = Mesh(np.array(jax.devices()), ("data",))
    half = x.shape[0] // 2
    rows = jax.make_array_from_process_local_data(
        NamedSharding(mesh, PartitionSpec("data")), x[process * half : (process + 1) * half], x.shape
    )
    out["rows_per_device"] = [s.data.shape[0] for s in rows.addressable_shards]

    def gather(a):
        return np.asarray(multihost_utils.process_allgather(a, tiled=True)).tolist()

    def attempt(name, fn):
        try:
            out[name] = fn()
        except Exception:
            out[name + "_error"] = traceback.format_exc()[-1500:]

    fit = vqlib.fit
    attempt("kmeans_from_init", lambda: gather(fit(rows, "kmeans", k=8, init=x[:8], max_iter=10, tol=0.0).centroids))
    attempt("kmeans_plus_plus", lambda: gather(fit(rows, "kmeans", k=8, max_iter=3).centroids))

    def sharded_search(kind, build, **search):
        index = vqlib.retrieval.build(x, kind, **build)  # the same index in every process (same data, key)
        scores, ids = vqlib.retrieval.search(vqlib.retrieval.shard(index, mesh), queries, **search)
        return [np.asarray(scores).tolist(), np.asarray(ids).tolist()]

    for name, kind, build, search in CASES:
        attempt(name, lambda: sharded_search(kind, build, **search))
    print("RESULT " + json.dumps(out))
"""

# (name, index kind, build options, search options): searched sharded in two processes, and here
CASES = [
    ("ivfflat_all_lists", "ivfflat", dict(nlist=4), dict(k=5, nprobe=4)),
    ("ivfpq_all_lists", "ivfpq", dict(nlist=4, m=4, k=64), dict(k=5, nprobe=4)),
    ("ivfflat_probed", "ivfflat", dict(nlist=4), dict(k=5, nprobe=2)),
]


def problem():
    """512 clustered (n, 8) float32 rows and 20 queries near the first rows: the same in every process."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(16, 8)).astype(np.float32) * 4
    x = (centers[rng.integers(0, 16, 512)] + rng.normal(size=(512, 8)).astype(np.float32)).astype(np.float32)
    return x, x[:20] + np.float32(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs():
    """The two processes' reports (the run is shared by the tests below)."""
    script = textwrap.dedent(_WORKER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    port = _free_port()
    here = os.path.dirname(os.path.abspath(__file__))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(port), str(i), here],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append((p.returncode, stdout, stderr))
    for returncode, stdout, stderr in outputs:
        failed = [line for line in stdout.splitlines() if line.startswith("INIT_FAILED ")]
        if failed:
            pytest.skip(f"jax.distributed.initialize failed on localhost: {json.loads(failed[0][12:])}")
        assert returncode == 0, stderr[-3000:]
    reports = [next(line for line in out.splitlines() if line.startswith("RESULT ")) for _, out, _ in outputs]
    return [json.loads(line[len("RESULT ") :]) for line in reports]


def test_two_processes_see_four_devices_and_half_the_rows_each(runs):
    for report in runs:
        assert report["devices"] == 4 and report["local_devices"] == 2
        assert report["rows_per_device"] == [128, 128]


@pytest.mark.parametrize("name,options", [("kmeans_from_init", "init"), ("kmeans_plus_plus", "default")])
def test_kmeans_on_a_row_sharded_global_array_equals_single_process(runs, name, options):
    x, _ = problem()
    init = dict(init=x[:8], max_iter=10, tol=0.0) if options == "init" else dict(max_iter=3)
    single = np.asarray(vqlib.fit(x, "kmeans", k=8, **init).centroids)
    for report in runs:
        assert name in report, report.get(name + "_error")
        # float32 sums in another order: measured max difference 1.4e-6 on centroids of size ~4
        np.testing.assert_allclose(np.array(report[name]), single, rtol=0, atol=1e-4)
    assert runs[0][name] == runs[1][name]  # one global result, the same in both processes


def _search_case(name):
    case = next(c for c in CASES if c[0] == name)
    marks = ()
    return pytest.param(*case, id=name, marks=marks)


@pytest.mark.parametrize("name,kind,build,search", [_search_case(c[0]) for c in CASES])
def test_sharded_search_across_processes_equals_single_process(runs, name, kind, build, search):
    x, queries = problem()
    scores, ids = vqlib.retrieval.search(vqlib.retrieval.build(x, kind, **build), queries, **search)
    for report in runs:
        assert name in report, report.get(name + "_error")
        got_scores, got_ids = (np.array(a) for a in report[name])
        np.testing.assert_allclose(got_scores, scores, rtol=1e-5, atol=1e-4)
        # ids equal except among equal scores (PQ codes tie often); the last column may tie with the
        # (k+1)-th, which is not shown: never counted as clear
        untied = np.abs(np.diff(scores, axis=1, prepend=-np.inf, append=scores[:, -1:])) > 1e-4
        clear = untied[:, :-1] & untied[:, 1:]
        assert clear.mean() > 0.3
        np.testing.assert_array_equal(got_ids[clear], ids[clear])
