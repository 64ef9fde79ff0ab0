"""vqlib's version: one place, read by the package face, the demo and pyproject.toml (setuptools)."""

__version__ = "0.2.0"
