"""recserve.memstat against a plain line-by-line reading of /proc/self/smaps."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from recserve.memstat import file_residency

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps"
)


def reference(paths: list[str]) -> dict[str, int]:
    """Rss per mapped file, one smaps line at a time (the format: a header line
    per mapping, its path last, then that mapping's fields)."""
    out = dict.fromkeys(paths, 0)
    current = None
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            first = line.split(maxsplit=5)
            if len(first) >= 5 and "-" in first[0] and ":" in first[3]:
                current = first[5].strip() if len(first) == 6 else None
            elif current in out and line.startswith("Rss:"):
                out[current] += int(line.split()[1]) * 1024
    return out


def test_file_residency_matches_a_line_by_line_reading(tmp_path):
    folders = [tmp_path / "models" / "als" / "v1", tmp_path / "models" / "with space" / "v 2"]
    arrays, paths = [], []
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True)
        for j, pages in enumerate((64, 3)):
            path = folder / f"part{j}.npy"
            np.save(path, np.arange(pages * 1024, dtype=np.float32) + i)
            a = np.load(path, mmap_mode="r")
            if j == 0:
                float(a[: a.size // 2].sum())  # half of it resident
            arrays.append(a)
            paths.append(str(path.resolve()))
    unmapped = tmp_path / "models" / "never-mapped.npy"
    np.save(unmapped, np.zeros(10))
    paths.append(str(unmapped.resolve()))
    got = file_residency(paths)
    want = reference(paths)
    assert got == want
    assert got[paths[0]] >= 32 * 4096 and got[paths[-1]] == 0
    # one file alone (the common folder is the file itself), and a relative path
    assert file_residency([paths[2]]) == {paths[2]: want[paths[2]]}
    assert file_residency([os.path.relpath(paths[0])]) == {paths[0]: want[paths[0]]}
    assert file_residency([]) == {}
    assert len(arrays) == 4  # the mappings stay alive until here
