"""Deterministic synthetic interaction logs with the shape of real ones.

Items have a Zipf-like popularity (a long tail), one or two genres, and a
quality; users have a long-tailed activity level and a concentrated taste over
genres (Dirichlet). Each event picks a genre from the user's taste and an item
from that genre by popularity, so co-occurrence carries signal beyond raw
popularity: collaborative filtering beats popularity on it, as on real data.
Everything is vectorised; 20M events take seconds, not minutes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.data.dataset import Dataset, IdMap, build_csr, features_matrix

log = logging.getLogger(__name__)

GENRES = [
    "Action",
    "Adventure",
    "Animation",
    "Children",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "SciFi",
    "Thriller",
    "War",
    "Western",
]
START = 1_577_836_800  # 2020-01-01T00:00:00Z
SPAN = 2 * 365 * 86_400


@dataclass
class Synthetic:
    """Generated events (0-based dense ids) and item metadata."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    item_genres: list[list[str]]
    n_users: int
    n_items: int


def generate(
    n_users: int = 5_000,
    n_items: int = 2_000,
    n_interactions: int = 200_000,
    seed: int = 0,
    zipf: float = 0.9,
    taste_concentration: float = 0.15,
) -> Synthetic:
    """Generate `n_interactions` distinct (user, item) events; same seed, same output."""
    if n_users <= 0 or n_items <= 0:
        raise ValueError("users and items must be positive")
    if n_interactions <= 0:
        raise ValueError("interactions must be positive")
    if n_interactions < n_users:
        raise ValueError(f"interactions: {n_interactions} is fewer than one per user ({n_users})")
    if n_interactions > 0.5 * n_users * n_items:
        raise ValueError(
            f"interactions: {n_interactions} would fill more than half of the "
            f"{n_users} x {n_items} matrix; use more users or items"
        )
    rng = np.random.default_rng(seed)
    n_genres = len(GENRES)

    # Items: genre sizes are themselves skewed; popularity is Zipf over a random rank.
    genre_weight = rng.dirichlet(np.full(n_genres, 2.0))
    primary = rng.choice(n_genres, size=n_items, p=genre_weight)
    secondary = np.where(rng.random(n_items) < 0.3, rng.integers(0, n_genres, n_items), -1)
    rank = rng.permutation(n_items)
    popularity = (rank + 1.0) ** -zipf
    quality = rng.normal(0.0, 0.5, n_items)

    # Per genre, an inverse CDF over its items stacked as g + cdf so one
    # searchsorted picks an item inside any genre g.
    by_genre = np.lexsort((np.arange(n_items), primary))
    g_sorted = primary[by_genre]
    w = popularity[by_genre]
    totals = np.bincount(g_sorted, weights=w, minlength=n_genres)
    cum = np.cumsum(w) - np.r_[0.0, np.cumsum(totals)][g_sorted]
    present = totals > 0
    stacked = g_sorted + cum / np.where(totals[g_sorted] > 0, totals[g_sorted], 1.0)

    # Users: concentrated tastes over the genres that have items; long-tailed activity.
    taste = rng.dirichlet(np.full(n_genres, taste_concentration), size=n_users)
    taste[:, ~present] = 0.0
    taste /= taste.sum(axis=1, keepdims=True)
    activity = rng.lognormal(0.0, 1.0, n_users)
    activity /= activity.sum()
    taste_cdf = np.cumsum(taste, axis=1)
    taste_cdf[:, -1] = 1.0
    user_start = rng.integers(START, START + SPAN // 2, n_users)
    user_span = rng.integers(86_400, SPAN // 2, n_users)

    keys = np.zeros(0, dtype=np.int64)
    target = n_interactions
    draw = int(target * 1.2) + 16
    for attempt in range(50):
        # Events per user in one multinomial draw (no per-event search); the
        # first round also gives every user one event, as in any real log.
        counts = rng.multinomial(draw, activity)
        if attempt == 0:
            counts += 1
        u = np.repeat(np.arange(n_users), counts)
        draw = u.size
        g = _draw_genres(taste_cdf, u, rng)
        pos = np.searchsorted(stacked, g + rng.random(draw) * (1 - 1e-12), side="right")
        pos = np.minimum(pos, n_items - 1)
        it = by_genre[pos]
        keys = _sorted_unique(np.concatenate([keys, u.astype(np.int64) * n_items + it]))
        if keys.size >= target:
            break
        # Heavy users keep drawing items they already have: over-draw the deficit.
        draw = max(int((target - keys.size) * 3), target // 20) + 16
    else:
        # A dense request with narrow tastes saturates: its users have drawn every
        # item of their genres. The rest are drawn uniformly over all pairs
        # (at most half are taken, so each round keeps at least half its draws).
        while keys.size < target:
            more = rng.integers(0, n_users * n_items, 2 * (target - keys.size) + 16)
            keys = _sorted_unique(np.concatenate([keys, more]))
    if keys.size > target:  # drop surplus events, but never a user's only one
        first = np.r_[True, (keys[1:] // n_items) != (keys[:-1] // n_items)]
        extra = rng.choice(np.flatnonzero(~first), size=keys.size - target, replace=False)
        keys = np.delete(keys, extra)
    users = (keys // n_items).astype(np.int64)
    items = (keys % n_items).astype(np.int64)

    affinity = np.log(n_genres * np.maximum(taste[users, primary[items]], 1e-3))
    mean = 3.4 + quality[items] + 0.35 * affinity + rng.normal(0.0, 0.3, n_users)[users]
    ratings = np.clip(np.rint(mean + rng.normal(0.0, 0.7, target)), 1, 5).astype(np.float32)
    timestamps = user_start[users] + (rng.random(target) * user_span[users]).astype(np.int64)

    genres = [
        [GENRES[primary[i]]]
        + ([GENRES[secondary[i]]] if secondary[i] not in (-1, primary[i]) else [])
        for i in range(n_items)
    ]
    return Synthetic(users, items, ratings, timestamps, genres, n_users, n_items)


def _draw_genres(
    taste_cdf: np.ndarray, users: np.ndarray, rng: np.random.Generator, chunk: int = 1 << 20
) -> np.ndarray:
    """One genre per event from its user's taste CDF (inverse CDF over the user's
    own few genres, in bounded chunks: no search over all users' CDFs)."""
    out = np.empty(users.size, np.int64)
    last = taste_cdf.shape[1] - 1
    for lo in range(0, users.size, chunk):
        u = users[lo : lo + chunk]
        r = rng.random(u.size)
        out[lo : lo + chunk] = np.minimum((taste_cdf[u] < r[:, None]).sum(axis=1), last)
    return out


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique for int64 keys by sorting (numpy 2's hash-based unique is slower here)."""
    a = np.sort(a)
    if a.size:
        a = a[np.r_[True, a[1:] != a[:-1]]]
    return a


def to_dataset(s: Synthetic, name: str = "synthetic") -> Dataset:
    """The generated data as a Dataset, ids as the CSV would spell them."""
    user_ids = IdMap.from_ids(str(i + 1) for i in range(s.n_users))
    item_ids = IdMap.from_ids(str(i + 1) for i in range(s.n_items))
    # Dense indices follow sorted id strings ("1" < "10" < "2"), as a reader's would.
    u_dense = user_ids.index(np.array([str(i + 1).encode() for i in range(s.n_users)], "S"))
    i_dense = item_ids.index(np.array([str(i + 1).encode() for i in range(s.n_items)], "S"))
    matrix, stamps = build_csr(
        u_dense[s.users], i_dense[s.items], s.ratings, s.timestamps, s.n_users, s.n_items
    )
    feats, names = features_matrix([s.item_genres[j] for j in np.argsort(i_dense)])
    titles = np.array([f"Item {j + 1}" for j in np.argsort(i_dense)], dtype=object)
    return Dataset(
        matrix,
        stamps,
        user_ids,
        item_ids,
        item_titles=titles,
        item_features=feats,
        feature_names=names,
        name=name,
    )


def write_csv(s: Synthetic, out: str | Path) -> Path:
    """Write the generic CSV layout: interactions.csv (time-ordered) and items.csv."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    order = np.argsort(s.timestamps, kind="stable")
    import pyarrow as pa  # only here: serving processes never write CSVs
    import pyarrow.csv as pacsv

    table = pa.table(
        {
            "user_id": pa.array(s.users[order] + 1),
            "item_id": pa.array(s.items[order] + 1),
            "rating": pa.array(s.ratings[order]),
            "timestamp": pa.array(s.timestamps[order]),
        }
    )
    opts = pacsv.WriteOptions(include_header=True, batch_size=1 << 20)
    pacsv.write_csv(table, folder / "interactions.csv", write_options=opts)
    items = pa.table(
        {
            "item_id": pa.array(np.arange(1, s.n_items + 1)),
            "title": pa.array([f"Item {i + 1}" for i in range(s.n_items)]),
            "genres": pa.array(["|".join(g) for g in s.item_genres]),
        }
    )
    pacsv.write_csv(items, folder / "items.csv", write_options=opts)
    return folder
