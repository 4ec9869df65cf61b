"""Process and mapped-file memory from /proc (Linux): what the memory metrics report.

`process_memory()` gives resident and proportional set sizes (PSS splits a
page shared by N processes into N parts, so it sums correctly over worker
processes that map the same bundles). `file_residency()` gives, per mapped
file, how many of its bytes are resident in this process. Elsewhere both
return zeros/empty rather than failing.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def process_memory() -> tuple[int, int]:
    """(resident bytes, proportional bytes) of this process; (0, 0) without /proc."""
    rss = pss = 0
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        return 0, 0
    return rss, pss


def file_residency(paths: Iterable[str | Path]) -> dict[str, int]:
    """Resident bytes of each mapped file among `paths` (0 when not mapped)."""
    wanted = {str(Path(p).resolve()): 0 for p in paths}
    if not wanted:
        return {}
    current: str | None = None
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                first = line.split(maxsplit=5)
                if len(first) >= 5 and "-" in first[0] and ":" in first[3]:
                    current = first[5].strip() if len(first) == 6 else None
                elif current in wanted and line.startswith("Rss:"):
                    wanted[current] += int(line.split()[1]) * 1024
    except OSError:
        pass
    return wanted
