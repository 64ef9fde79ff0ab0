"""`python -m vqlib`: a user mistake prints one line on stderr and exits with code 2, never a
traceback; `index build` without --m picks a documented default.

End to end in subprocesses for a handful of mistakes (started together: one interpreter start of
wall time), and in-process through `vqlib.__main__.main` for the rest.
"""

import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

import vqlib
from vqlib.__main__ import main
from vqlib.retrieval.cli import default_m


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    paths = {name: folder / name for name in ("x.npy", "q.npy", "x1d.npy", "xint.npy", "xodd.npy", "obj.npy")}
    np.save(paths["x.npy"], x)
    np.save(paths["q.npy"], x[:4] + np.float32(0.01))
    np.save(paths["x1d.npy"], x[0])
    np.save(paths["xint.npy"], (x * 10).astype(np.int64))
    np.save(paths["xodd.npy"], x[:, :7])
    np.save(paths["obj.npy"], np.array([{"a": 1}], dtype=object), allow_pickle=True)
    paths["text.npy"] = folder / "text.npy"
    paths["text.npy"].write_text("1,2,3\n4,5,6\n")
    paths["pickle.npy"] = folder / "pickle.npy"
    paths["pickle.npy"].write_bytes(pickle.dumps(x))
    paths["ids-short.npy"] = folder / "ids-short.npy"
    np.save(paths["ids-short.npy"], np.arange(10))
    paths["ids-dup.npy"] = folder / "ids-dup.npy"
    np.save(paths["ids-dup.npy"], np.zeros(300, np.int64))
    paths["codebook.vq"] = folder / "codebook.vq"
    vqlib.save(paths["codebook.vq"], vqlib.codebooks.KMeansCodebook(centroids=np.ones((2, 8), np.float32)))
    paths["truncated.vq"] = folder / "truncated.vq"
    paths["truncated.vq"].write_bytes(paths["codebook.vq"].read_bytes()[:-9])
    if hasattr(os, "mkfifo"):
        paths["fifo"] = folder / "fifo"
        os.mkfifo(paths["fifo"])
    paths["missing.npy"] = folder / "missing.npy"
    paths["missing.vq"] = folder / "missing.vq"
    paths["out.vq"] = folder / "out.vq"
    paths["nodir/out.vq"] = folder / "nodir" / "out.vq"
    paths["folder"] = folder
    return {name: str(path) for name, path in paths.items()}


def _args(argv: list[str], files: dict, **extra) -> list[str]:
    """argv with each {name} replaced by the path of that file (names hold dots: not str.format)."""
    names = files | extra
    return [re.sub(r"\{([^}]+)\}", lambda m: names[m.group(1)], a) for a in argv]


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _fails(capsys, argv: list[str], match: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert re.search(match, line), line
    return line


# ----------------------------------------------------------------------------- end to end, in subprocesses

_SUBPROCESS = {
    "missing-data": (["index", "build", "{missing.npy}", "-o", "{out.vq}"], r"missing\.npy does not exist"),
    "not-npy": (["index", "build", "{text.npy}", "-o", "{out.vq}"], r"not a \.npy file"),
    "info-not-vqlib": (["index", "info", "{x.npy}"], r"x\.npy is not a readable vqlib file"),
    "rvq-without-m": (["index", "build", "{x.npy}", "--type", "rvq", "-o", "{out.vq}"], r"needs --m"),
}


@pytest.fixture(scope="module")
def subprocess_runs(files):
    """Every case of _SUBPROCESS run as `python -m vqlib ...`, all at once."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "vqlib", *_args(argv, files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, (argv, _) in _SUBPROCESS.items()
    }
    return {name: (p.wait(timeout=300), *p.communicate()) for name, p in started.items()}


@pytest.mark.parametrize("case", list(_SUBPROCESS))
def test_user_mistake_in_a_subprocess_is_one_line_and_exit_2(subprocess_runs, case):
    returncode, stdout, stderr = subprocess_runs[case]
    assert returncode == 2, stderr
    line = _one_line(stderr)
    assert line.startswith("vqlib index ") and ": error: " in line
    assert re.search(_SUBPROCESS[case][1], line), line
    assert stdout == ""


# ----------------------------------------------------------------------------- in-process: index build


@pytest.mark.parametrize(
    "argv,match",
    [
        (["{missing.npy}"], r"data file .*missing\.npy does not exist"),
        (["{text.npy}"], r"not a \.npy file; write the array with numpy\.save"),
        (["{pickle.npy}"], r"not a \.npy file"),
        (["{obj.npy}"], r"not a readable \.npy file"),
        (["{x1d.npy}"], r"shape \(8,\); data must be \(n, d\)"),
        (["{xint.npy}"], r"floating dtype"),
        (["{folder}"], r"not a regular file"),
        (["{x.npy}", "--ids", "{ids-short.npy}"], r"ids must have shape \(300,\)"),
        (["{x.npy}", "--ids", "{ids-dup.npy}"], r"repeated"),
        (["{x.npy}", "--ids", "{missing.npy}"], r"ids file .* does not exist"),
        (["{x.npy}", "--type", "nope"], r"kind must be one of"),
        (["{x.npy}", "--type", "rvq"], r"--type rvq needs --m"),
        (["{x.npy}", "--type", "aq"], r"--type aq needs --m"),
        (["{xodd.npy}", "--type", "pqfs"], r"needs an even --m dividing d=7"),
        (["{x.npy}", "--nlist", "0"], r"nlist must be >= 1"),
        (["{x.npy}", "--nlist", "301"], r"nlist"),
        (["{x.npy}", "--m", "3"], r"not divisible"),
        (["{x.npy}", "--bits", "3"], r"unknown option"),
        (["{x.npy}", "--type", "flat", "--m", "2"], r"stores raw vectors"),
    ],
)
def test_build_mistakes(capsys, files, argv, match):
    _fails(capsys, ["index", "build", *_args(argv, files), "-o", files["out.vq"]], match)
    assert not os.path.exists(files["out.vq"])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_build_from_a_named_pipe_does_not_block(capsys, files):
    _fails(capsys, ["index", "build", files["fifo"], "-o", files["out.vq"]], r"not a regular file")


@pytest.mark.parametrize("output", ["{nodir/out.vq}", "{folder}"])
def test_build_output_that_cannot_be_written_fails_before_training(capsys, files, output):
    _fails(capsys, ["index", "build", files["x.npy"], "-o", *_args([output], files)], r"cannot write the index")


def test_argparse_mistakes_exit_2_without_traceback(capsys):
    for argv in (["index", "build"], ["index", "build", "x.npy", "-o", "o.vq", "--metric", "hamming"], ["nope"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "error:" in err


# ----------------------------------------------------------------------------- build without --m, then search


@pytest.mark.parametrize(
    "d,fast_scan,expected",
    [(128, False, 32), (100, False, 25), (96, False, 24), (8, False, 2), (7, False, 1), (2, False, 1), (1, False, 1)]
    + [(128, True, 64), (8, True, 4), (6, True, 2), (7, True, None)],
)
def test_default_m_is_a_quarter_byte_per_dimension(d, fast_scan, expected):
    assert default_m(d, fast_scan=fast_scan) == expected
    if expected is not None:
        assert d % expected == 0


@pytest.fixture(scope="module")
def built(files):
    """`index build x.npy -o out.vq` with no --m (ivfpq, d=8: m = 2, 2 bytes per vector)."""
    path = os.path.join(files["folder"], "built.vq")
    main(["index", "build", files["x.npy"], "--nlist", "4", "-o", path])
    return path


def test_build_without_m_uses_the_default(built, capsys):
    index = vqlib.load(built, expect=vqlib.retrieval.Index)
    assert index.kind == "ivfpq" and vqlib.retrieval.bytes_per_vector(index) == 2 and index.ntotal == 300
    main(["index", "info", built])
    assert "ivfpq index, metric l2, 300 vectors of d=8, nlist=4, 2 bytes per vector" in capsys.readouterr().out


def test_search_prints_neighbours(built, files, capsys):
    main(["index", "search", built, files["q.npy"], "-k", "3", "--nprobe", "4"])
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 4
    assert [int(row.split()[0].split(":")[0]) for row in rows] == [0, 1, 2, 3]  # each query's own row first


@pytest.mark.parametrize(
    "argv,match",
    [
        (["{missing.vq}", "{q.npy}"], r"missing\.vq does not exist; build one"),
        (["{x.npy}", "{q.npy}"], r"not a readable vqlib file"),
        (["{truncated.vq}", "{q.npy}"], r"not a readable vqlib file"),
        (["{codebook.vq}", "{q.npy}"], r"not the expected vqlib\.Index"),
        (["{built}", "{missing.npy}"], r"queries file .* does not exist"),
        (["{built}", "{xodd.npy}"], r"queries has dimension 7 but the index was built for d=8"),
        (["{built}", "{x1d.npy}"], r"queries must be \(n, d\)"),
        (["{built}", "{q.npy}", "-k", "0"], r"k must be >= 1"),
        (["{built}", "{q.npy}", "-k", "301"], r"larger than the 300 vectors"),
        (["{built}", "{q.npy}", "--nprobe", "5"], r"nprobe=5 exceeds nlist=4"),
        (["{built}", "{q.npy}", "--rerank", "20"], r"rerank needs the raw vectors"),
        (["{built}", "{q.npy}", "-o", "{nodir/out.vq}"], r"cannot write the results"),
    ],
)
def test_search_mistakes(capsys, files, built, argv, match):
    _fails(capsys, ["index", "search", *_args(argv, files, built=built)], match)


@pytest.mark.parametrize(
    "target,match",
    [("{missing.vq}", "does not exist"), ("{codebook.vq}", "not the expected"), ("{folder}", "directory")],
)
def test_info_mistakes(capsys, files, target, match):
    _fails(capsys, ["index", "info", *_args([target], files)], match)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_info_on_a_named_pipe_does_not_block(capsys, files):
    _fails(capsys, ["index", "info", files["fifo"]], r"named pipe")


# ----------------------------------------------------------------------------- every command, end to end

_E2E_CHAINS = {
    # name: commands run one after the other; "subprocess" chains as `python -m vqlib ...` (the real
    # entry point, each chain in its own thread), the others in-process through `main` meanwhile
    "codebook": [
        ["fit", "{x.npy}", "--method", "pq", "--m", "2", "--k", "16", "-o", "{e2e}/pq.vq"],
        ["encode", "{e2e}/pq.vq", "{x.npy}", "-o", "{e2e}/codes.npy"],
        ["decode", "{e2e}/pq.vq", "{e2e}/codes.npy", "-o", "{e2e}/x_hat.npy", "--json"],
        ["fit", "{x.npy}", "--k", "8", "--option", "tol=0.0", "-o", "{e2e}/km.vq", "--json"],
        ["encode", "{e2e}/km.vq", "{x.npy}", "-o", "{e2e}/km_codes.npy", "--json"],
        ["decode", "{e2e}/km.vq", "{e2e}/km_codes.npy", "-o", "{e2e}/km_x_hat.npy"],
    ],
    "index": [
        ["index", "build", "{x.npy}", "--nlist", "4", "--m", "4", "--keep-vectors", "-o", "{e2e}/ix.vq", "--json"],
        ["index", "search", "{e2e}/ix.vq", "{q.npy}", "-k", "3", "--nprobe", "4", "--rerank", "20", "--json"],
        ["index", "info", "{e2e}/ix.vq", "--json"],
    ],
    "command-help": [[c, "--help"] for c in ("demo", "fit", "encode", "decode", "index", "bench")],
}
_E2E_SUBPROCESS_CHAINS = {
    "demo": [["demo", "--n", "1500", "--json"]],
    "bench": [["bench", "kernels", "--json"]],
    "help": [["--help"]],
}


def _in_process(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `main(argv)`."""
    import contextlib
    import io

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code or 0
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def e2e(files):
    """Every chain of _E2E_CHAINS and _E2E_SUBPROCESS_CHAINS: {name: [(returncode, stdout, stderr), ...]}."""
    from concurrent.futures import ThreadPoolExecutor

    folder = os.path.join(files["folder"], "e2e")
    os.makedirs(folder, exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def subprocess_run(argv):
        done = subprocess.run(
            [sys.executable, "-m", "vqlib", *argv], capture_output=True, text=True, env=env, timeout=600
        )
        return done.returncode, done.stdout, done.stderr

    def chain(commands, run):
        results = []
        for argv in commands:
            results.append(run(_args(argv, files, e2e=folder)))
            if results[-1][0]:
                break
        return results

    with ThreadPoolExecutor(len(_E2E_SUBPROCESS_CHAINS)) as pool:
        started = {name: pool.submit(chain, c, subprocess_run) for name, c in _E2E_SUBPROCESS_CHAINS.items()}
        runs = {name: chain(commands, _in_process) for name, commands in _E2E_CHAINS.items()}
        runs |= {name: future.result() for name, future in started.items()}
    return folder, runs


def _ok(runs, name: str, steps: int) -> list[str]:
    assert len(runs[name]) == steps, runs[name][-1][2]
    for returncode, _, stderr in runs[name]:
        assert returncode == 0, stderr
    return [stdout for _, stdout, _ in runs[name]]


def test_fit_encode_decode_end_to_end(e2e, files):
    import json

    folder, runs = e2e
    out = _ok(runs, "codebook", 6)
    assert re.match(r"fitted pq \(ProductCodebook, 1 bytes per vector\) on 300 x 8 in .* -> .*pq\.vq", out[0]), out[
        0
    ]  # 2 codes of 4 bits
    cb = vqlib.load(os.path.join(folder, "pq.vq"))
    x = np.load(files["x.npy"])
    codes = np.load(os.path.join(folder, "codes.npy"))
    assert codes.shape == (300, 2) and codes.dtype == np.int32
    np.testing.assert_array_equal(codes, np.asarray(vqlib.encode(cb, x)))
    x_hat = np.load(os.path.join(folder, "x_hat.npy"))
    np.testing.assert_allclose(x_hat, np.asarray(vqlib.decode(cb, codes)), rtol=1e-6)
    assert json.loads(out[2])["shape"] == [300, 8]
    fitted = json.loads(out[3])
    assert fitted["type"] == "KMeansCodebook" and fitted["bits_per_vector"] == 3 and 0 < fitted["relative_mse"] < 1
    assert vqlib.load(os.path.join(folder, "km.vq")).centroids.shape == (8, 8)
    assert json.loads(out[4])["shape"] == [300]  # k-means codes: one per row
    assert np.load(os.path.join(folder, "km_x_hat.npy")).shape == (300, 8)


def test_index_end_to_end_json(e2e):
    import json

    folder, runs = e2e
    built, found, info = (json.loads(o) for o in _ok(runs, "index", 3))
    assert built["kind"] == "ivfpq" and built["bytes_per_vector"] == 4 and built["vectors_kept"]
    assert info == {k: v for k, v in built.items() if k not in ("output", "seconds")}
    assert [row[0] for row in found["ids"]] == [0, 1, 2, 3]  # each query's own row first
    assert vqlib.load(os.path.join(folder, "ix.vq")).ntotal == 300


def test_demo_end_to_end_json(e2e):
    """Every table has vqlib and faiss rows, finite numbers, honest bytes (TurboQuant's norm counted)."""
    import json

    (out,) = _ok(e2e[1], "demo", 1)
    result = json.loads(out)
    for table in ("kmeans", "codebooks", "index"):
        methods = [row["method"] for row in result[table]]
        assert any(m.startswith("vqlib") for m in methods) and any(m.startswith("faiss-cpu") for m in methods)
        for row in result[table]:
            assert all(np.isfinite(v) for v in row.values() if isinstance(v, float)), row
    rows = {row["method"]: row for row in result["codebooks"]}
    assert rows["vqlib TurboQuant 1 bit/dim + f16 norm"]["bytes"] == 10  # 64 one-bit codes + a 16-bit norm
    assert rows["vqlib PQ 8x8"]["bytes"] == rows["faiss-cpu ProductQuantizer 8x8"]["bytes"] == 8
    kmeans = result["kmeans"]
    assert abs(kmeans[1]["relative_mse"] / kmeans[2]["relative_mse"] - 1) < 1e-3  # same seeds, same Lloyd
    assert all(0 <= row["recall"] <= 1 for row in result["index"])


def test_bench_end_to_end_json(e2e):
    import json

    (out,) = _ok(e2e[1], "bench", 1)
    assert json.loads(out)["script"] == "benchmarks/gpu_kernels.py"


def test_every_option_has_help(e2e):
    """`--help` of every command: no option without its help text."""
    (top,) = _ok(e2e[1], "help", 1)
    assert "demo" in top and "bench" in top and "compress" in top
    for command, out in zip(
        ("demo", "fit", "encode", "decode", "index", "bench"), _ok(e2e[1], "command-help", 6), strict=True
    ):
        assert out.startswith(f"usage: vqlib {command}"), out
    parser = __import__("vqlib.__main__", fromlist=["build_parser"]).build_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if action.choices and isinstance(action.choices, dict):  # sub-commands
                stack.extend(action.choices.values())
            elif action.dest != "help" and action.option_strings:
                assert action.help, f"{p.prog} {action.option_strings} has no help text"


@pytest.mark.parametrize(
    "argv,match",
    [
        (["fit", "{missing.npy}", "-o", "{out.vq}"], r"data file .* does not exist"),
        (["fit", "{x.npy}", "--method", "nope", "-o", "{out.vq}"], r"unknown method 'nope'"),
        (["fit", "{x.npy}", "--method", "pq", "-o", "{out.vq}"], r"needs option\(s\) \['m'\]"),
        (["fit", "{x.npy}", "--option", "foo", "-o", "{out.vq}"], r"--option takes NAME=VALUE"),
        (["fit", "{x.npy}", "--option", "foo=1", "-o", "{out.vq}"], r"unknown option\(s\) \['foo'\]"),
        (["fit", "{x.npy}", "-o", "{nodir/out.vq}"], r"cannot write the codebook"),
        (["encode", "{missing.vq}", "{x.npy}", "-o", "{out.vq}"], r"codebook file .* does not exist; fit one"),
        (["encode", "{x.npy}", "{x.npy}", "-o", "{out.vq}"], r"not a readable vqlib file"),
        (
            ["encode", "{codebook.vq}", "{xodd.npy}", "-o", "{out.vq}"],
            r"x has dimension 7 but the codebook was fitted on d=8",
        ),
        (["decode", "{codebook.vq}", "{x.npy}", "-o", "{out.vq}"], r"holds float32 values; codes are integers"),
        (["demo", "--n", "10"], r"--n 10 is too small"),
    ],
)
def test_codebook_command_mistakes(capsys, files, argv, match):
    _fails(capsys, _args(argv, files), match)
