"""Progress bars on stderr for long fits, builds and the command line, through tqdm.

A bar is drawn only when it is asked for (`enabled=True`, a function's `progress=` / `verbose=`)
and stderr is a terminal: piped or captured output (scripts, CI, notebooks' logs) stays silent.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def _shown(enabled: bool) -> bool:
    return bool(enabled) and sys.stderr.isatty()


def progress(iterable, *, total: int | None, desc: str, enabled: bool):
    """Yields from `iterable`, with a bar `desc: 40%|####      | 2/5 [00:03<00:04]` when enabled on a terminal."""
    if not _shown(enabled):
        yield from iterable
        return
    yield from tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)


def steps(total: int, *, desc: str, enabled: bool) -> tqdm:
    """A bar advanced by hand (`bar.update()`, `bar.set_description(...)`) over `total` named steps;
    closed with `bar.close()` or as a context manager. Silent unless enabled on a terminal."""
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False, disable=not _shown(enabled))
