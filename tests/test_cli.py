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
