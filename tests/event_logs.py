"""Small hand-made event logs for router tests, and their popularity reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recserve.data import Dataset, load_dataset


def events_dataset(path: Path, events: list[tuple[str, str]]) -> Dataset:
    """(user, item) pairs written as a CSV (value 1, time = position) and loaded."""
    rows = [f"{u},{i},1,{t}" for t, (u, i) in enumerate(events)]
    path.write_text("user,item,rating,timestamp\n" + "\n".join(rows) + "\n")
    return load_dataset(str(path))


def cluster_events() -> list[tuple[str, str]]:
    """30 clusters of 20 items, each of 1,500 users with 8 events from one
    cluster, every item about as popular as any other: a model finds the
    cluster, popularity only adds noise."""
    rng = np.random.default_rng(2)
    rows = []
    for u in range(1500):
        cluster = rng.integers(30)
        for i in rng.choice(20, 8, replace=False):
            rows.append((f"u{u}", f"i{cluster * 20 + i}"))
    return rows


def popular(ds: Dataset, banned: set[str], k: int) -> list[str]:
    """The k most-interacted training items not in `banned`, ties by lower index:
    the popularity fallback's answer, computed without the models."""
    x = ds.interactions
    counts = np.bincount(x.indices, minlength=x.shape[1])
    order = np.lexsort((np.arange(counts.size), -counts))
    return [i for i in ds.items.ids(order) if i not in banned][:k]


def zipf_block(
    seed: int, users: int = 600, items: int = 200, per_user: int = 10
) -> list[tuple[str, str]]:
    """`users` users with `per_user` distinct Zipf(0.9)-popular items each; the
    popular items sort last by id, so index order is not popularity order."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, items + 1) ** 0.9
    p /= p.sum()
    return [
        (f"u{u}", f"i{items - 1 - i:03d}")
        for u in range(users)
        for i in rng.choice(items, per_user, replace=False, p=p)
    ]
