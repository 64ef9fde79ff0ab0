"""A dependency-free progress bar on stderr for long fits and builds."""

from __future__ import annotations

import sys
import time


def progress(iterable, *, total: int | None, desc: str, enabled: bool):
    """Yields from `iterable`, redrawing `desc [#####     ] i/total  elapsed` when enabled."""
    if not enabled:
        yield from iterable
        return
    start = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += 1
        elapsed = time.perf_counter() - start
        if total:
            filled = int(30 * done / total)
            bar = f"[{'#' * filled}{' ' * (30 - filled)}] {done}/{total}"
        else:
            bar = f"{done}"
        sys.stderr.write(f"\r{desc} {bar} {elapsed:6.1f}s")
        sys.stderr.flush()
    sys.stderr.write("\n")
