"""Shared fixtures: a small synthetic dataset and the optional real ml-100k."""

from __future__ import annotations

import gc
import os
from pathlib import Path

# Before gRPC is first imported. With its fork support on (grpcio's default
# here), a child forked to run a preexec_fn (pyspark's Java gateway, the test
# servers started with one) restarts gRPC's poller, whose epoll descriptor
# close_fds has closed: the child aborts before exec, "Epoll1Poller ...
# epoll_wait error: Bad file descriptor" (grpc/grpc#43055; 5 children in 300
# in a process with a live channel, none with it off). A CPU-loaded run lost
# the Spark tests' gateway so. Nothing in this process forks to keep gRPC.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import pytest

from recserve.data import Dataset, generate, to_dataset

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"


@pytest.fixture(autouse=True)
def _collect_servers_left_in_cycles():
    """A stopped server's App sits in reference cycles until the cyclic GC runs,
    each mapped bundle file holding a descriptor: a full run reached 1,000+ open
    descriptors before a collection. Collect when they pile up: past twice
    what the last collection left (servers of module-scoped fixtures stay)."""
    yield
    if len(os.listdir("/proc/self/fd")) > _FDS_BEFORE_COLLECTING[0]:
        gc.collect()
        _FDS_BEFORE_COLLECTING[0] = max(256, 2 * len(os.listdir("/proc/self/fd")))


_FDS_BEFORE_COLLECTING = [256]


@pytest.fixture(scope="session")
def small() -> Dataset:
    """1,000 users x 300 items x 30,000 events, deterministic."""
    return to_dataset(generate(1_000, 300, 30_000, seed=3), name="small")


@pytest.fixture(scope="session")
def ml100k_path() -> Path:
    """The real MovieLens 100K folder; the test is skipped when ../shared/data is absent."""
    if not (ML100K / "u.data.xz").exists() and not (ML100K / "u.data").exists():
        pytest.skip(f"{ML100K} not present (a fresh clone has no ../shared/data)")
    return ML100K
