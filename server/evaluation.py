"""Offline evaluation: splitting protocols and vectorised ranking and rating metrics.

Protocols
  random    per user, a seeded random fraction of their interactions is held out
  temporal  per user, the last n interactions (by timestamp) are held out
  users     a fraction of users is held out entirely (strong generalisation);
            part of each held-out user's history is folded in at test time and
            the rest is the test set
Metrics at each K: Recall@K (hits / min(K, |test|)), NDCG@K, Precision@K,
MAP@K, HitRate@K, catalogue coverage; MRR within the largest K; RMSE and MAE
for rating models.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from recserve.data import Dataset
from recserve.models import create
from recserve.models.base import (
    Recommender,
    blend_popularity,
    fill_unreached,
    liked_counts,
    popular_order,
    prior_weight,
)
from recserve.models.registry import MODELS

log = logging.getLogger(__name__)

PROTOCOLS = ("random", "temporal", "users")


@dataclass
class Split:
    """A train dataset and held-out test interactions (users x items, raw values)."""

    train: Dataset
    test: sp.csr_matrix
    fold_in: sp.csr_matrix | None = None  # users protocol: histories given at test time


def _row_of(m: sp.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))


def _split_mask(
    m: sp.csr_matrix, test_mask: np.ndarray, ts: np.ndarray
) -> tuple[sp.csr_matrix, np.ndarray, sp.csr_matrix]:
    def part(mask: np.ndarray) -> sp.csr_matrix:
        sub = sp.csr_matrix(
            (
                m.data[mask],
                m.indices[mask],
                np.r_[0, np.cumsum(np.bincount(_row_of(m)[mask], minlength=m.shape[0]))],
            ),
            shape=m.shape,
        )
        sub.has_sorted_indices = True
        return sub

    return part(~test_mask), ts[~test_mask], part(test_mask)


def split_random(
    ds: Dataset, fraction: float = 0.2, seed: int = 0, min_interactions: int = 2
) -> Split:
    """Hold out round(fraction * n) (at least 1) random interactions of each user with >= 2."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction: must be in (0, 1), got {fraction}")
    m = ds.interactions
    lengths = np.diff(m.indptr)
    n_test = np.where(
        lengths >= max(2, min_interactions), np.clip(np.rint(fraction * lengths), 1, lengths - 1), 0
    ).astype(np.int64)
    rng = np.random.default_rng(seed)
    row = _row_of(m)
    order = np.lexsort((rng.random(m.nnz), row))
    pos = np.empty(m.nnz, np.int64)
    pos[order] = np.arange(m.nnz) - m.indptr[row[order]]
    train, ts, test = _split_mask(m, pos < n_test[row], ds.timestamps)
    return Split(ds.with_interactions(train, ts), test)


def split_temporal(ds: Dataset, n: int = 1) -> Split:
    """Hold out each user's last `n` interactions (users with more than n)."""
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    if not ds.has_timestamps:
        log.warning("%s has no timestamps: file order stands in for time", ds.name)
    m = ds.interactions
    lengths = np.diff(m.indptr)
    row = _row_of(m)
    order = np.lexsort((np.arange(m.nnz), ds.timestamps, row))
    pos = np.empty(m.nnz, np.int64)
    pos[order] = np.arange(m.nnz) - m.indptr[row[order]]
    test_mask = (pos >= (lengths - n)[row]) & (lengths > n)[row]
    train, ts, test = _split_mask(m, test_mask, ds.timestamps)
    return Split(ds.with_interactions(train, ts), test)


def split_users(
    ds: Dataset, fraction: float = 0.1, fold_in_fraction: float = 0.8, seed: int = 0
) -> Split:
    """Hold out a fraction of users; their histories split into fold-in and test parts."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction: must be in (0, 1), got {fraction}")
    if not 0 < fold_in_fraction < 1:
        raise ValueError(f"fold_in_fraction: must be in (0, 1), got {fold_in_fraction}")
    m = ds.interactions
    lengths = np.diff(m.indptr)
    rng = np.random.default_rng(seed)
    eligible = np.flatnonzero(lengths >= 2)
    if eligible.size == 0:
        raise ValueError(
            f"{ds.name}: the users protocol holds out users with 2 or more events (a "
            "fold-in part and a test part), and no user has that many"
        )
    held = rng.choice(eligible, size=max(1, round(fraction * eligible.size)), replace=False)
    is_held = np.zeros(m.shape[0], bool)
    is_held[held] = True
    if not lengths[~is_held].any():
        raise ValueError(
            f"{ds.name}: the users protocol holds out {held.size} of "
            f"{np.count_nonzero(lengths)} users with events, which leaves no events to train "
            "on; it needs more users (or use the random or temporal protocol)"
        )
    row = _row_of(m)
    n_test = np.where(
        is_held,
        np.clip(np.rint((1 - fold_in_fraction) * lengths), 1, np.maximum(lengths - 1, 1)),
        0,
    ).astype(np.int64)
    order = np.lexsort((rng.random(m.nnz), row))
    pos = np.empty(m.nnz, np.int64)
    pos[order] = np.arange(m.nnz) - m.indptr[row[order]]
    test_mask = pos < n_test[row]
    fold_mask = is_held[row] & ~test_mask
    keep = ~is_held[row]
    train, ts, _ = _split_mask(m, ~keep, ds.timestamps)
    _, _, test = _split_mask(m, test_mask, ds.timestamps)
    _, _, fold_in = _split_mask(m, fold_mask, ds.timestamps)
    return Split(ds.with_interactions(train, ts), test, fold_in)


def ranking_metrics(
    recs: np.ndarray, test: sp.csr_matrix, ks: Sequence[int], n_items: int
) -> dict[str, float]:
    """Mean ranking metrics of recommendation lists (rows of recs, -1 = empty slot)
    against binary relevance (the nonzeros of each test row). Rows without any
    relevant item are skipped."""
    per_user, coverage = user_metrics(recs, test, ks, n_items)
    out: dict[str, float] = {"users": float(len(per_user["mrr"]))}
    for name, values in per_user.items():
        out[name] = float(np.mean(values))
    return out | coverage


def user_metrics(
    recs: np.ndarray, test: sp.csr_matrix, ks: Sequence[int], n_items: int
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """`ranking_metrics` per user (one value per row with a relevant item, in
    row order), and the catalogue coverage at each k: what a choice made per
    group of users (tune's min_events) is measured with."""
    test = test.tocsr().copy()
    test.eliminate_zeros()
    test.sort_indices()
    keep = np.diff(test.indptr) > 0
    recs, test = recs[keep], test[keep]
    n, width = recs.shape
    if n == 0:
        raise ValueError("no user has a relevant test item to evaluate")
    if max(ks) > width:
        raise ValueError(f"k={max(ks)} exceeds the {width} recommendations given")
    n_rel = np.diff(test.indptr)
    test_keys = _row_of(test) * n_items + test.indices
    rec_keys = np.repeat(np.arange(n, dtype=np.int64), width) * n_items + recs.ravel()
    pos = np.minimum(np.searchsorted(test_keys, rec_keys), test_keys.size - 1)
    hits = ((test_keys[pos] == rec_keys) & (recs.ravel() >= 0)).reshape(n, width)
    hits = hits.astype(np.float64)
    discount = 1.0 / np.log2(np.arange(2, width + 2))
    ideal = np.cumsum(discount)
    out: dict[str, np.ndarray] = {}
    coverage: dict[str, float] = {}
    for k in sorted(set(ks)):
        h = hits[:, :k]
        n_hit = h.sum(axis=1)
        denom = np.minimum(k, n_rel)
        precision_at = np.cumsum(h, axis=1) / np.arange(1, k + 1)
        top = recs[:, :k]
        out[f"recall@{k}"] = n_hit / denom
        out[f"precision@{k}"] = n_hit / k
        out[f"ndcg@{k}"] = (h @ discount[:k]) / ideal[denom - 1]
        out[f"map@{k}"] = (precision_at * h).sum(axis=1) / denom
        out[f"hit_rate@{k}"] = (n_hit > 0).astype(np.float64)
        coverage[f"coverage@{k}"] = float(np.unique(top[top >= 0]).size / n_items)
    first = np.argmax(hits, axis=1)
    out["mrr"] = np.where(hits.any(axis=1), 1.0 / (first + 1), 0.0)
    return out, coverage


def rating_metrics(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """RMSE and MAE of predicted ratings."""
    err = np.asarray(predicted, np.float64) - np.asarray(actual, np.float64)
    if err.size == 0:
        raise ValueError("no ratings to compare")
    return {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err)))}


Z90 = 1.6448536269514722  # half-width of the central 90% of a standard normal


def rating_and_interval_metrics(model: Recommender, test: sp.csr_matrix) -> dict[str, float]:
    """RMSE/MAE of a rating model on held-out ratings and, when it predicts a std,
    `interval90`: the fraction of ratings inside the central 90% predictive
    interval (a calibrated model scores about 0.9)."""
    means, stds = [], []
    for u in np.flatnonzero(np.diff(test.indptr)):
        mean, std = model.score(int(u), test.indices[test.indptr[u] : test.indptr[u + 1]])
        means.append(mean)
        stds.append(std)
    if not means:
        raise ValueError("no held-out ratings to compare")
    pred = np.concatenate(means)
    out = rating_metrics(pred, test.data)
    if all(s is not None for s in stds):
        out["interval90"] = float(np.mean(np.abs(test.data - pred) <= Z90 * np.concatenate(stds)))
    return out


def given_split(train: Dataset, test: Dataset) -> tuple[Split, dict[str, int]]:
    """A split someone else made (MovieLens' u1.base / u1.test, a team's own
    holdout): `test`'s events on `train`'s users and items. Events of users or
    items `train` does not know cannot be recommended to or for, so they are
    dropped and counted. Returns the split and {events, kept, unknown_users,
    unknown_items} (events counted once, by the first reason)."""
    u_map = np.asarray(train.users.index(test.users.ids(np.arange(test.n_users))), np.int64)
    i_map = np.asarray(train.items.index(test.items.ids(np.arange(test.n_items))), np.int64)
    m = test.interactions.tocoo()
    rows, cols = u_map[m.row], i_map[m.col]
    keep = (rows >= 0) & (cols >= 0)
    held = sp.csr_matrix(
        (m.data[keep], (rows[keep], cols[keep])), shape=(train.n_users, train.n_items)
    )
    counts = {
        "events": int(m.nnz),
        "kept": int(keep.sum()),
        "unknown_users": int((rows < 0).sum()),
        "unknown_items": int(((rows >= 0) & (cols < 0)).sum()),
    }
    if counts["kept"] == 0:
        raise ValueError(
            f"test: none of its {m.nnz} events are of a user and an item in the training "
            f"data ({counts['unknown_users']} of unknown users, {counts['unknown_items']} "
            "of unknown items)"
        )
    return Split(train, held), counts


def make_split(
    ds: Dataset, protocol: str, fraction: float = 0.2, seed: int = 0, leave_last: int = 1
) -> Split:
    """The split for a protocol name."""
    if protocol == "random":
        return split_random(ds, fraction, seed)
    if protocol == "temporal":
        return split_temporal(ds, leave_last)
    if protocol == "users":
        return split_users(ds, fraction, seed=seed)
    raise ValueError(f"protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")


def _cutoffs(ks: Sequence[int]) -> list[int]:
    out = sorted({int(k) for k in ks})
    if not out or out[0] <= 0:
        raise ValueError(f"k: expected positive cut-offs, got {out}")
    return out


def relevant_events(split: Split, threshold: float | None) -> tuple[sp.csr_matrix, np.ndarray]:
    """The held-out events that count as relevant (0/1), and the users with one."""
    relevant = split.test.copy()
    # Without a threshold every held-out event with a positive value is relevant:
    # a held-out dislike (a negative value) is not something to have recommended.
    keep = relevant.data >= threshold if threshold is not None else relevant.data > 0
    relevant.data = keep.astype(np.float32)
    relevant.eliminate_zeros()
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    if users.size == 0 and split.test.nnz:
        # Said before the fit, which would be wasted.
        values = split.test.data
        if threshold is not None:
            raise ValueError(
                f"threshold: no held-out value is >= {threshold:g} (they range "
                f"{values.min():g} to {values.max():g}), so no user has a relevant test item"
            )
        # Book-Crossing marks implicit events 0; a column of zeros is the same.
        way_out = (
            "evaluate and tune count zeros as relevant with --threshold 0"
            if values.max() == 0
            else "negative values are dislikes, never relevant"
        )
        raise ValueError(
            f"no held-out value is positive (they range {values.min():g} to "
            f"{values.max():g}), and a held-out event is relevant when its value is > 0; "
            f"{way_out}"
        )
    return relevant, users


def evidence_counts(
    model: Recommender, users: np.ndarray | None = None, histories: sp.csr_matrix | None = None
) -> np.ndarray:
    """Each known user's (training row) or history row's number of events
    that count as evidence for the model (`Recommender.evidence`): what its
    `min_events` gate compares."""
    if histories is not None:
        rows = [histories[r].data for r in range(histories.shape[0])]
    else:
        assert users is not None
        rows = [model.training_row(int(u))[1] for u in users]
    return np.array([model.evidence(np.asarray(v, np.float32)) for v in rows], np.int64)


def as_served(
    model: Recommender,
    recs: np.ndarray,
    scores: np.ndarray,
    users: np.ndarray | None = None,
    histories: sp.csr_matrix | None = None,
) -> np.ndarray:
    """The rows of recommend() (known `users`) or recommend_histories()
    (`histories`, one row each) as the service answers them (seen items
    filtered, the default fallback, popularity): a row with fewer events than
    the model's gate (`min_events` for a known user, `min_history` for a
    history) is the most popular unseen items; for a
    `sparse_scores` model, a row whose evidence reaches no eligible item is
    too, and items scored 0 (unreached) are the most popular unreached ones,
    not the first by index (docs/serving.md, "Which user"); a history under the
    model's `history_prior`, or a known user under its `user_prior`, is its
    ranking blended with popularity's. Other rows are returned as they are."""
    if recs.size == 0:
        return recs
    gated = np.zeros(recs.shape[0], bool)
    gate = model.params.get("min_events", 0) if histories is None else model.history_gate()
    if gate and not model.serves_cold:
        gated = evidence_counts(model, users, histories) < gate
    valid = recs >= 0
    todo = np.flatnonzero(gated)
    if model.sparse_scores:
        todo = np.union1d(todo, np.flatnonzero((valid & ~(scores > 0)).any(axis=1)))
    # a new user's history under `history_prior`, a known user under
    # `user_prior`: blended with popularity (the router's _with_prior), unless
    # gated or cold (for a sparse model: its evidence reaches nothing)
    blend = np.zeros(recs.shape[0], bool)
    c = model.params.get("history_prior" if histories is not None else "user_prior", 0.0)
    counts = None  # training counts, read once
    if c:
        counts = None if model.user_items is None else liked_counts(model.user_items)
        if counts is None or not counts.any():
            c = 0.0  # no training counts: the router does not blend (Slot.popularity_known)
    if c and not model.serves_cold:
        blend = ~gated & ((valid & (scores > 0)).any(axis=1) if model.sparse_scores else True)
        if histories is None:
            assert users is not None
            blend &= np.array([not model.is_cold(int(u)) for u in users], bool)
        todo = np.setdiff1d(todo, np.flatnonzero(blend))
    if todo.size == 0 and not blend.any():
        return recs
    assert model.user_items is not None
    if counts is None:
        counts = liked_counts(model.user_items)
    order = popular_order(counts)  # the router's Slot.popular_order
    out = recs.copy()
    rows = np.empty((2, model.n_items), np.float32)
    for r in np.flatnonzero(blend):
        if histories is not None:
            n = model.prior_row(rows[0], row=histories[int(r)])
        else:
            assert users is not None
            n = model.prior_row(rows[0], int(users[r]))
        if n is not None:
            items, _ = blend_popularity(
                rows, counts, prior_weight(c, n), recs.shape[1], model.sparse_scores
            )
            out[r] = -1
            out[r, : items.size] = items
    row = np.empty(model.n_items, np.float32)
    for r in todo:
        if gated[r]:
            seen = (
                histories[int(r)].indices
                if histories is not None
                else model.training_row(int(users[r]))[0]  # type: ignore[index]
            )
            row.fill(0)
            row[seen] = np.nan
            filled = None
        else:
            if histories is not None:
                model.dense_history(histories[int(r)], row, True)
            else:
                assert users is not None
                model.dense_user(int(users[r]), row, True)
            n = int(valid[r].sum())
            filled = fill_unreached(recs[r, :n], scores[r, :n], row, order)
        out[r] = -1
        if filled is None:  # cold to this model: the popularity fallback's answer
            fill = order[~np.isnan(row[order])][: recs.shape[1]]
            out[r, : fill.size] = fill
        else:
            out[r, :n] = filled[0]
    return out


def evaluate(
    model: Recommender,
    ds: Dataset,
    protocol: str = "random",
    ks: Sequence[int] = (10, 20, 50),
    fraction: float = 0.2,
    seed: int = 0,
    leave_last: int = 1,
    threshold: float | None = None,
    split: Split | None = None,
) -> dict[str, Any]:
    """Fit `model` on a split of `ds` and measure it on the held-out part.

    threshold: when set, only held-out interactions with value >= threshold
    count as relevant (e.g. 4 for "rated 4 or 5"); otherwise those with a
    positive value (a negative one is a dislike). split: a split already made
    (by make_split with these settings, so several models share one, or by
    given_split, recorded as protocol "given").
    """
    ks = _cutoffs(ks)
    if split is None:
        split = make_split(ds, protocol, fraction, seed, leave_last)
    relevant, users = relevant_events(split, threshold)
    t0 = time.perf_counter()
    model.fit(split.train)
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if split.fold_in is not None:
        histories = split.fold_in[users]
        recs, scores = model.recommend_histories(histories, max(ks))
        recs = as_served(model, recs, scores, histories=histories)
    else:
        recs, scores = model.recommend(users, max(ks))
        recs = as_served(model, recs, scores, users=users)
    rec_s = time.perf_counter() - t1
    result: dict[str, Any] = {
        "algorithm": model.algorithm,
        "params": model.params,
        "protocol": protocol,
        "dataset": ds.summary(),
        "threshold": threshold,
        "fit_seconds": round(fit_s, 4),
        "recommend_seconds": round(rec_s, 4),
        "metrics": ranking_metrics(recs, relevant[users], ks, ds.n_items),
    }
    if model.predicts_ratings and split.fold_in is None:
        result["metrics"].update(rating_and_interval_metrics(model, split.test))
    return result


def compare(
    models: Sequence[tuple[str, Recommender]],
    ds: Dataset,
    protocol: str = "random",
    ks: Sequence[int] = (10, 20, 50),
    fraction: float = 0.2,
    seed: int = 0,
    leave_last: int = 1,
    threshold: float | None = None,
    split: Split | None = None,
) -> dict[str, dict[str, Any]]:
    """evaluate() for several (label, model) pairs on one split, made once (or
    given): the figures differ only by the models, never by the held-out events.
    A model that cannot be fitted on this data (EASE over its memory bound, a
    content model without item features, training that diverged) does not
    lose the others' figures: its entry is {"algorithm", "params", "error"}.
    What is wrong for every entry (the cut-offs, the threshold) raises first."""
    if split is None:
        split = make_split(ds, protocol, fraction, seed, leave_last)
    _cutoffs(ks)
    relevant_events(split, threshold)
    out: dict[str, dict[str, Any]] = {}
    for label, model in models:
        try:
            out[label] = evaluate(
                model, ds, protocol, ks, fraction, seed, leave_last, threshold, split
            )
        except ValueError as exc:
            log.error("compare: entry %r not fitted: %s", label, exc)
            out[label] = {"algorithm": model.algorithm, "params": model.params, "error": str(exc)}
    return out


# -- popularity as the floor ---------------------------------------------------------

# Content ranks by item features: its place is items and users without events
# (a hybrid's part, a fallback), so ranking known users below popularity is no
# sign of a bad fit and is logged without a warning.
FEATURE_MODELS = ("content",)
# Below this share of popularity's figure a model is said to rank worse than
# it; nearer is a tie within a split's noise (EASE and item-kNN land there on
# data that holds nothing but popularity).
POPULARITY_MARGIN = 0.9
TRAIN_HINT = (
    "`recserve tune` searches its parameters (and can compare algorithms, popularity "
    "included); `recserve evaluate --compare` shows others on one split"
)


def popularity_baseline(
    ds: Dataset, split: Split, ks: Sequence[int], threshold: float | None = None
) -> dict[str, float]:
    """Popularity's ranking metrics on `split`: the floor a trained model should
    clear. Data whose only signal is how popular items are (every user takes the
    head items) makes matrix factorizations fit noise; without this figure beside
    theirs, such a model publishes and serves lists no better than random."""
    return evaluate(create("popularity"), ds, ks=ks, split=split, threshold=threshold)["metrics"]


def popularity_gap(
    label: str,
    algorithm: str,
    metric: str,
    value: float,
    baseline: float,
    hint: str = TRAIN_HINT,
) -> tuple[int, str] | None:
    """(log level, message) when `value` of ranking `metric` is clearly below
    popularity's `baseline` on the same held-out events (under
    POPULARITY_MARGIN of it); None when it is not."""
    if algorithm == "popularity" or not value < POPULARITY_MARGIN * baseline:
        return None
    what = (
        f"{label} ({algorithm}): {metric} {value:.4f} is {value / baseline:.2f} of "
        f"popularity's {baseline:.4f} on the same held-out events"
    )
    if algorithm in FEATURE_MODELS:
        return logging.INFO, f"{what} (expected: it ranks by item features, for cold items)"
    cls = MODELS.get(algorithm)  # None for a hybrid
    if cls is not None and cls.predicts_ratings:
        hint = (
            f"{algorithm} is fitted to predict ratings (its figures are rmse and mae): "
            "its highest predictions favour items few users rated. To rank, an implicit "
            "model (als, ease, itemknn) is the usual choice; " + hint
        )
    return (
        logging.WARNING,
        f"{what}: on this data it ranks worse than the most popular items. {hint}",
    )
