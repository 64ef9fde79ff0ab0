"""The documentation site builds in strict mode: a broken link, a docstring cross-reference that does
not resolve or a page missing from the navigation fails (mkdocs.yml; `pip install -e ".[docs]"`).
The pages' Python examples run as doctests of their own (pytest collects docs/**/*.md)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NEEDED = ("mkdocs", "material", "mkdocstrings_handlers.python", "griffe_public_redundant_aliases")


def test_docs_build_strict(tmp_path):
    missing = [name for name in NEEDED if importlib.util.find_spec(name.split(".")[0]) is None]
    if missing:
        pytest.skip(f"the docs extra is not installed ({', '.join(missing)} missing): pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    warnings = [line for line in out.stderr.splitlines() if "WARNING" in line]
    assert not warnings, "\n".join(warnings)
    api = (tmp_path / "site" / "reference" / "codebooks" / "index.html").read_text()
    assert 'id="vqlib.codebooks.fit_kmeans"' in api  # re-exported functions are documented
    assert (tmp_path / "site" / "plots" / "rate_distortion.png").is_file()  # the benchmark plots are served
