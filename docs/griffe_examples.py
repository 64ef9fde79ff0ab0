"""griffe extension for the docs build: vqlib's docstrings title their runnable example `Example:`
(STYLE.md); griffe's Google parser knows the plural. Renaming it makes the example a code section
(rendered as Python, its output not read as Markdown links) rather than a prose admonition."""

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
