"""The code passes `ruff check` with the settings in pyproject.toml."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    out = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_imports_flow_one_way_with_no_cycles():
    """import-linter's contracts in pyproject.toml: wings -> codebooks -> kernels -> base, no
    cycles among sibling modules, private modules imported by their own package only."""
    linter = shutil.which("lint-imports")
    if linter is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    out = subprocess.run([linter, "--no-cache"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_heavy_first_schedule_names_existing_files():
    """tests/conftest.py's HEAVY_FIRST (the files the workers start with) names files that exist."""
    from conftest import HEAVY_FIRST

    missing = [path for path in HEAVY_FIRST if not (ROOT / path).is_file()]
    assert not missing, f"renamed or removed: {missing}; update HEAVY_FIRST in tests/conftest.py"
