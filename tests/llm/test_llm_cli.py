"""`python -m vqlib compress` / `ppl`, in-process through `vqlib.__main__.main`."""

import llm_reference as reference
import pytest

import vqlib.llm
from vqlib.__main__ import main

pytest.importorskip("transformers")

SHAPE = dict(reference.TINY, vocab_size=320)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    weights = reference.random_weights(0, tied=True, **SHAPE)
    reference.write_hf_folder(str(folder), weights, SHAPE, tokenizer=reference.train_tokenizer(SHAPE["vocab_size"]))
    return folder


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    return e.value.code, err


def test_compress_then_ppl(hf_folder, tmp_path, capsys):
    out = tmp_path / "m.vq"
    argv = ["compress", str(hf_folder), "--method", "rtn", "--bits", "4", "--option", "group_size=16"]
    main([*argv, "-o", str(out)])
    assert "bits per weight" in capsys.readouterr().out
    model = vqlib.llm.load(out)
    assert model.describe()["method"] == "rtn"
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    main(["ppl", str(out), "--text", str(text), "--ctx", "32", "--windows", "3"])
    assert capsys.readouterr().out.startswith("perplexity ")


def test_compress_with_distill(hf_folder, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, again and again. " * 200)
    out = tmp_path / "d.vq"
    argv = ["compress", str(hf_folder), "--method", "rtn", "--bits", "2", "--option", "group_size=16"]
    main([*argv, "--distill", "3", "--calibration", str(text), "-o", str(out)])
    printed = capsys.readouterr().out
    assert "distill: held-out KL to the float model" in printed and "bits per weight" in printed
    assert vqlib.llm.load(out).describe()["method"] == "rtn"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["compress", "{model}", "--method", "gptq", "--bits", "2"], "unknown method 'gptq'"),
        (["compress", "{model}", "--method", "quip", "--bits", "7"], "quip codes bits=2"),
        (["compress", "{model}", "--method", "rtn", "--bits", "4", "--option", "groupsize=8"], "unknown option"),
        (["compress", "{model}", "--method", "rtn", "--bits", "4", "--option", "group_size=64"], "fewer than"),
        (["compress", "{missing}", "--method", "rtn", "--bits", "4"], "no such file"),
        (["ppl", "{missing}"], "no such file"),
        (["compress", "{model}", "--method", "rtn", "--bits", "4", "--distill", "-1"], "--distill must be >= 0"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(hf_folder, tmp_path, capsys, argv, message):
    out = tmp_path / "out.vq"
    argv = [a.format(model=hf_folder, missing=tmp_path / "absent.gguf") for a in argv]
    if argv[0] == "compress":
        argv += ["-o", str(out)]
    code, err = _run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()
