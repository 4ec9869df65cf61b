"""Hyper-parameter search (`recserve tune`) and learned hybrid weights.

The search space is each model's own `Param` declarations (`search`, `log`,
`search_choices`): there is no second table. Optuna's TPE sampler, seeded,
proposes parameters; the first trial is always the defaults, so the best is
never worse than them on the validation split. A model that trains in passes
(`budget_param`: ALS iterations, BPR/SVD epochs) is first scored at a quarter
of its passes, and Optuna's median pruner stops the trials that are already
behind there.

Validation never touches `evaluate`'s test split: the data is split exactly as
`evaluate` splits it (same protocol, fraction and seed), and the validation
split is taken again, by the same protocol, from that training part only.

Hybrid weights are fitted the same way: each component is trained on the
validation split's training part, its top candidates are scored once, and the
search re-blends them (min-max per component, weighted sum, as the server
blends) for each proposed weight vector.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from recserve.config import LEARNED_HYBRIDS as HYBRIDS_FILE
from recserve.data import Dataset
from recserve.evaluation import (
    Split,
    as_served,
    evaluate,
    evidence_counts,
    make_split,
    popularity_baseline,
    popularity_gap,
    ranking_metrics,
    relevant_events,
    user_metrics,
)
from recserve.models import Recommender, bundle, create
from recserve.models.base import (
    Param,
    TrainingError,
    blend_popularity,
    liked_counts,
    popular_order,
    prior_weight,
)
from recserve.models.registry import MODELS

log = logging.getLogger(__name__)

RUNG = 4  # a trial is first scored at 1/RUNG of its passes
MINIMIZE = ("rmse", "mae")


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:  # pragma: no cover - a dependency; named for a broken install
        raise RuntimeError("recserve tune needs optuna (pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def check_metric(metric: str) -> tuple[str, int]:
    """(metric name as evaluate reports it, the cut-off K); ValueError naming it."""
    name = metric.strip().lower()
    if name in MINIMIZE or name == "mrr":
        return name, 20
    base, _, k = name.partition("@")
    if base not in ("recall", "ndcg", "precision", "map", "hit_rate") or not k.isdigit():
        raise ValueError(
            f"metric: expected recall@K, ndcg@K, precision@K, map@K, hit_rate@K, mrr, rmse "
            f"or mae, got {metric!r}"
        )
    if int(k) < 1:
        raise ValueError(f"metric: K must be >= 1, got {metric!r}")
    return name, int(k)


def space(cls: type[Recommender], fixed: Mapping[str, Any] = ()) -> dict[str, Param]:
    """The parameters `tune` searches for a model class (minus those fixed)."""
    return {n: p for n, p in cls.params_spec.items() if p.tuned and n not in dict(fixed)}


def suggest(trial: Any, name: str, p: Param) -> Any:
    """One parameter's value for an Optuna trial, from its declaration."""
    if p.search_choices is not None:
        return trial.suggest_categorical(name, list(p.search_choices))
    assert p.search is not None
    lo, hi = p.search
    if p.type is int:
        return trial.suggest_int(name, int(lo), int(hi), log=p.log)
    return trial.suggest_float(name, float(lo), float(hi), log=p.log)


def splits(
    ds: Dataset,
    protocol: str,
    fraction: float,
    seed: int,
    leave_last: int,
    given: Split | None = None,
) -> tuple[Split, Split]:
    """(evaluate's split, the validation split made from its training part only).
    `given`: a split made elsewhere (evaluate --test) in place of evaluate's."""
    outer = given if given is not None else make_split(ds, protocol, fraction, seed, leave_last)
    inner = make_split(outer.train, protocol, fraction, seed, leave_last)
    return outer, inner


def check_validation(
    inner: Split, metric: str, threshold: float | None, protocol: str, fraction: float
) -> None:
    """Refuse, before any trial, a validation split that nothing can be scored
    on (too few events per user): every trial would fail the same way."""
    test = inner.test.tocsr().copy()
    if metric not in MINIMIZE:  # what evaluate() counts as relevant
        keep = test.data >= threshold if threshold is not None else test.data > 0
        test.data = keep.astype(np.float32)
    test.eliminate_zeros()
    if test.nnz and inner.train.nnz:
        return
    if inner.test.nnz and inner.train.nnz and metric not in MINIMIZE:
        relevant_events(inner, threshold)  # events held out, none relevant: says why
    ds = inner.train
    what = "held-out event" if metric in MINIMIZE else "relevant held-out item"
    hint = " or a lower --threshold" if threshold is not None and metric not in MINIMIZE else ""
    raise ValueError(
        f"data: the validation split ({protocol} protocol, fraction {fraction}, made from "
        f"the training part of evaluate's split) has no user with a {what} "
        f"({ds.n_users} users, {ds.nnz + inner.test.nnz} events in it); tune needs more "
        f"events per user{hint}"
    )


def score(model: Recommender, split: Split, metric: str, k: int, threshold: float | None) -> float:
    """Fit on the split's training part; the metric on its held-out part."""
    result = evaluate(model, split.train, ks=[k], split=split, threshold=threshold)
    value = result["metrics"].get(metric)
    if value is None:
        raise ValueError(f"metric: {model.algorithm} does not report {metric}")
    return float(value)


def popularity_floor(split: Split, metric: str, k: int, threshold: float | None) -> float | None:
    """Popularity's `metric` on the split's held-out part, the floor a tuned
    model should clear; None for a metric popularity does not report (rmse)."""
    if metric in MINIMIZE:
        return None
    return float(popularity_baseline(split.train, split, [k], threshold)[metric])


# The largest min_events tune learns: a model that needs more events than this
# before it beats popularity is one to replace, not to gate.
GATE_MAX = 50
# How clearly popularity must win below min_events: a one-sided paired z on
# the per-user metric (gain / its standard error), so that chance among the
# thresholds tried does not set one.
GATE_Z = 2.0
# New users folded in from a short inline history: the validation users' own
# counts seldom go that low (every ml-100k user has 20 or more ratings), and a
# known user with one event is not a new user with a one-item history (the
# first is a light user, the second often is not), so inline histories get
# their own gate, `min_history`, scored on users held out of one more fit,
# each folded in from h of its events (h in NEW_USER_LENGTHS) and measured on
# the rest.
NEW_USER_LENGTHS = (1, 2, 3, 4, 5)
NEW_USER_EVENTS = 3  # events a user needs to be one (h to fold in, one or more to score)
NEW_USER_SHARE = 0.2  # of the users with that many
NEW_USER_MAX = 1000
NEW_USER_MIN = 50  # fewer eligible users than this: none are made
# The `history_prior` values tune tries (popularity weighs c / (c + n) in a new
# user's answer of n events): the best blend weight measured fell from about
# 0.6 at one item to 0.2-0.4 at five (docs/algorithms.md).
PRIOR_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# Histories x catalogue items one set of new users' blends may read (each blend
# reads every item): past it, evenly spaced histories only (a 1M-item
# catalogue: 200 per history length), never fewer than PRIOR_MIN_ROWS.
PRIOR_CELLS = 200_000_000
PRIOR_MIN_ROWS = 100


def new_user_histories(
    ds: Dataset, threshold: float | None, seed: int = 0, by_time: bool = False
) -> tuple[Dataset, list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]] | None:
    """`ds` without a share of its users with NEW_USER_EVENTS or more events,
    and those users' events in random order (`by_time`: oldest first, as the
    temporal protocol holds out the latest): (the training data left,
    [(items, values)] per user, [which of them are relevant, as `evaluate`
    counts relevance] per user). None when too few users have that many."""
    m = ds.interactions.tocsr()
    lengths = np.diff(m.indptr)
    pool = np.flatnonzero(lengths >= NEW_USER_EVENTS)
    n = min(NEW_USER_MAX, int(pool.size * NEW_USER_SHARE))
    if pool.size < NEW_USER_MIN or n < 1:
        return None
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(pool, n, replace=False))
    events: list[tuple[np.ndarray, np.ndarray]] = []
    relevant: list[np.ndarray] = []
    for u in held:
        lo, hi = m.indptr[u], m.indptr[u + 1]
        order = rng.permutation(hi - lo)
        if by_time:  # ties as the temporal split breaks them
            order = np.lexsort((np.arange(hi - lo), ds.timestamps[lo:hi]))
        items, values = m.indices[lo:hi][order], m.data[lo:hi][order]
        events.append((items, values))
        relevant.append(values >= threshold if threshold is not None else values > 0)
    lengths = lengths.copy()
    lengths[held] = 0
    keep = np.repeat(lengths > 0, np.diff(m.indptr))
    train = sp.csr_matrix(
        (m.data[keep], m.indices[keep], np.r_[0, np.cumsum(lengths)]), shape=m.shape
    )
    train.has_sorted_indices = m.has_sorted_indices
    return ds.with_interactions(train, ds.timestamps[keep]), events, relevant


def _new_user_cases(
    model: Recommender,
    events: list[tuple[np.ndarray, np.ndarray]],
    relevant: list[np.ndarray],
) -> Iterator[tuple[sp.csr_matrix, sp.csr_matrix]]:
    """For each length h of NEW_USER_LENGTHS, new users' (new_user_histories)
    first h events as `model`'s history rows and their relevant later events
    as a truth matrix: the users with a relevant event after h."""
    for h in NEW_USER_LENGTHS:
        rows = [r for r, rel in enumerate(relevant) if rel[h:].any()]
        if not rows:
            continue
        histories = model.history_matrix(
            [events[r][0][:h] for r in rows], [events[r][1][:h] for r in rows]
        )
        truth_items = [np.sort(events[r][0][h:][relevant[r][h:]]) for r in rows]
        indptr = np.r_[0, np.cumsum([t.size for t in truth_items])]
        truth = sp.csr_matrix(
            (np.ones(indptr[-1], np.float32), np.concatenate(truth_items), indptr),
            shape=(len(rows), model.n_items),
        )
        yield histories, truth


def _against_popularity(
    model: Recommender,
    recs: np.ndarray,
    scores: np.ndarray,
    truth: sp.csr_matrix,
    metric: str,
    k: int,
    **where: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(events, the model's metric as served ungated, popularity's gain over
    it) per row of recs (`users=` known users, or `histories=`), for a model
    fitted with no gate."""
    evidence = evidence_counts(model, **where)
    served = as_served(model, recs, scores, **where)
    model.params["min_events"] = GATE_MAX + 1 + int(evidence.max())  # every row gated
    popular = as_served(model, recs, scores, **where)
    model.params["min_events"] = 0
    mine = user_metrics(served, truth, [k], model.n_items)[0][metric]
    return evidence, mine, user_metrics(popular, truth, [k], model.n_items)[0][metric] - mine


def _prior_metrics(
    model: Recommender,
    histories: sp.csr_matrix | None,
    truth: sp.csr_matrix,
    metric: str,
    k: int,
    users: np.ndarray | None = None,
) -> np.ndarray | None:
    """The metric of each history's answer (or each known user's, `users`,
    with `histories` None) under each prior c of PRIOR_GRID (history_prior,
    user_prior; as served: blend_popularity), shape (grid, rows); None for a
    model without dense rows (an approximate index). A blend reads the whole
    catalogue, so past PRIOR_CELLS (rows x items) only evenly spaced rows are
    scored and the others are NaN, as are users the model learned nothing
    of (served as new ones)."""
    assert model.user_items is not None
    counts = liked_counts(model.user_items)
    rows = np.empty((2, model.n_items), np.float32)
    n_rows = histories.shape[0] if histories is not None else len(users)  # type: ignore[arg-type]
    limit = max(PRIOR_MIN_ROWS, PRIOR_CELLS // max(model.n_items, 1))
    scored = np.unique(np.linspace(0, n_rows - 1, min(n_rows, limit)).astype(np.int64))
    if histories is None:
        assert users is not None
        scored = np.array([r for r in scored if not model.is_cold(int(users[r]))], np.int64)
    recs = np.full((len(PRIOR_GRID), scored.size, k), -1, np.int64)
    for i, r in enumerate(scored):
        if histories is not None:
            n = model.prior_row(rows[0], row=histories[int(r)])
        else:
            assert users is not None
            n = model.prior_row(rows[0], int(users[r]))
        if n is None:
            return None
        dense = rows[0].copy()
        for j, c in enumerate(PRIOR_GRID):
            rows[0] = dense
            items, _ = blend_popularity(rows, counts, prior_weight(c, n), k, model.sparse_scores)
            recs[j, i, : items.size] = items
    out = np.full((len(PRIOR_GRID), n_rows), np.nan)
    if scored.size:
        for j, x in enumerate(recs):
            out[j, scored] = user_metrics(x, truth[scored], [k], model.n_items)[0][metric]
    return out


def _new_user_gains(
    fit: Callable[[Dataset], Recommender],
    train: Dataset,
    metric: str,
    k: int,
    threshold: float | None,
    by_time: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None] | None:
    """_against_popularity for each new user and history length, and
    _prior_metrics of the same histories: `new_user_histories` of `train`, one
    more fit without those users. None when there are too few."""
    made = new_user_histories(train, threshold, by_time=by_time)
    if made is None:
        return None
    rest, events, relevant = made
    model = fit(rest)
    evidence, mine, gain, prior = [], [], [], []
    for histories, truth in _new_user_cases(model, events, relevant):
        recs, scores = model.recommend_histories(histories, k)
        found = _against_popularity(model, recs, scores, truth, metric, k, histories=histories)
        evidence.append(found[0])
        mine.append(found[1])
        gain.append(found[2])
        prior.append(_prior_metrics(model, histories, truth, metric, k))
    if not evidence:
        return None
    blended = None if any(p is None for p in prior) else np.concatenate(prior, axis=1)
    return np.concatenate(evidence), np.concatenate(mine), np.concatenate(gain), blended


def _z(d: np.ndarray) -> float:
    """A paired z: the sum of per-user differences over its standard error."""
    spread = float(d.std()) * np.sqrt(d.size) if d.size else 0.0
    return float(d.sum()) / spread if spread > 0 else 0.0


# A hybrid's component is left out of its blend (tune_hybrid) where the
# validation shows, at paired z >= GATE_Z, that its answers without it lose
# less than this share of the metric, for known users (the weight search's
# validation users) and new users' histories (learn_hybrid_prior's) alike:
# every served call computes a dense row per component, for nothing there.
PRUNE_TOLERANCE = 0.005


def _bearable(full: np.ndarray, pruned: np.ndarray) -> bool:
    """Whether per-user scores `pruned` lose less than PRUNE_TOLERANCE of the
    mean of `full` (the same users), an upper bound at GATE_Z standard errors."""
    if full.size == 0:
        return False
    loss = full - pruned
    bound = float(loss.mean()) + GATE_Z * float(loss.std()) / np.sqrt(loss.size)
    return bound < PRUNE_TOLERANCE * float(full.mean())


def prunable(
    cands: Candidates, weights: Mapping[str, float], metric: str, k: int
) -> tuple[list[str], np.ndarray]:
    """The components a blend's validation users can do without: in order of
    weight (the lightest first), each that can be left out together with the
    ones before it, its answers bearing it against every component's
    (_bearable); never all. Returns them and the per-user scores of the
    blend of every component."""
    names = cands.names

    def scores(left_out: Sequence[str]) -> np.ndarray:
        w = [0.0 if n in left_out else float(weights.get(n, 0.0)) for n in names]
        recs = cands.blend(w, k)
        return user_metrics(recs, cands.relevant, [k], cands.n_items)[0][metric]

    full = scores(())
    out: list[str] = []
    for c in sorted(names, key=lambda n: (weights.get(n, 0.0), n)):
        if len(out) + 1 < len(names) and _bearable(full, scores([*out, c])):
            out.append(c)
    return out, full


def _learn_prior(gated: np.ndarray, blended: np.ndarray) -> tuple[float, int]:
    """The `history_prior` of PRIOR_GRID whose answers (`blended`, grid x
    histories) score best on average, when they beat the gate's (`gated`, as
    served with min_history) clearly (paired z >= GATE_Z); (0.0, 0) otherwise.
    Returns (the prior, its row in the grid)."""
    scored = ~np.isnan(blended[0])  # _prior_metrics' rows (all, below PRIOR_CELLS)
    j = int(np.argmax(blended[:, scored].mean(axis=1)))
    if _z(blended[j, scored] - gated[scored]) >= GATE_Z:
        return PRIOR_GRID[j], j
    return 0.0, 0


def _best_count(evidence: np.ndarray, gain: np.ndarray) -> int:
    """The event count below which popularity's gain over the model (per user)
    is largest in total, when that total is at least GATE_Z standard errors;
    0 when there is none."""
    best, best_total = 0, 0.0
    for n in np.unique(evidence[evidence < GATE_MAX]) + 1:
        d = gain[evidence < n]
        total = float(d.sum())
        spread = float(d.std()) * np.sqrt(d.size)
        if total > best_total and spread > 0 and total / spread >= GATE_Z:
            best, best_total = int(n), total
    return best


def learn_min_events(
    algorithm: str,
    params: Mapping[str, Any],
    split: Split,
    metric: str,
    k: int,
    threshold: float | None,
    threads: int = 0,
    new_users: bool = True,
    by_time: bool = False,
    known_prior: bool = True,
) -> dict[str, Any]:
    """The model's gates, learned on the validation split: the number of events
    below which popularity's answer (what the service gives a user the gate
    sends down the chain) beats the model's by the most in total, clearly
    (paired z >= GATE_Z over the users it gates); 0 where there is no such
    point. `min_events` (known users) is learned on the validation users;
    with `new_users`, `min_history` (inline histories) on new users folded in
    from 1 to 5 events (`_new_user_gains`: one more fit), with the validation
    users too where they are inline histories (users protocol); -1 (as
    min_events) when too few users could be made new ones. `by_time`: new
    users are folded in from their oldest events (temporal protocol).

    With new users (and dense rows: not for an approximate index), the
    `history_prior` of PRIOR_GRID whose blend with popularity answers their
    histories best is learned too, kept only when it beats min_history's
    answers clearly (paired z >= GATE_Z); min_history is then 0. Where the
    validation users are known ones, `user_prior` is learned on them the same
    way against min_events' answers (with `known_prior`); min_events is then 0.

    Returns {"min_events", "min_history", "history_prior", "user_prior", "users",
    "gated", "value",
    "gated_value"} (the validation users, at the gate that applies to them)
    and {"new_histories", "new_gated", "new_value", "new_gated_value"} (the
    new users' histories; 0 and None when none were made)."""
    unknown = {"new_histories": 0, "new_gated": 0, "new_value": None, "new_gated_value": None}
    none = {"min_events": 0, "min_history": -1, "history_prior": 0.0, "user_prior": 0.0}
    none |= {"users": 0, "gated": 0}
    none |= {"value": None}
    none |= {"gated_value": None} | unknown
    cls = MODELS[algorithm]
    if metric in MINIMIZE or cls.serves_cold or "min_events" not in cls.params_spec:
        return none

    def fit(data: Dataset) -> Recommender:
        ungated = {"min_events": 0, "min_history": -1, "history_prior": 0.0, "user_prior": 0.0}
        model = create(algorithm, **{**params, **ungated})
        model.n_threads = threads
        return model.fit(data)

    model = fit(split.train)
    relevant, users = relevant_events(split, threshold)
    if users.size == 0:
        return none
    inline = split.fold_in is not None  # the validation users are inline histories
    if inline:
        where: dict[str, Any] = {"histories": split.fold_in[users]}
        recs, scores = model.recommend_histories(where["histories"], k)
    else:
        recs, scores = model.recommend(users, k)
        where = {"users": users}
    evidence, mine, gain = _against_popularity(
        model, recs, scores, relevant[users], metric, k, **where
    )
    min_events = _best_count(evidence, gain)
    # known users (not inline histories): the user_prior whose blend beats the
    # min_events gate's answers clearly; min_events is then 0
    user_prior, blended = 0.0, None
    if known_prior and not inline:
        blended = _prior_metrics(model, None, relevant[users], metric, k, users=users)
        if blended is not None:
            as_gated = np.where(evidence < min_events, mine + gain, mine)
            user_prior, ju = _learn_prior(as_gated, blended)
    if user_prior:
        min_events = 0
    new = None
    if new_users:
        new = _new_user_gains(fit, split.train, metric, k, threshold, by_time)
    min_history = -1
    if new is not None:
        pooled = (np.r_[evidence, new[0]], np.r_[gain, new[2]]) if inline else (new[0], new[2])
        min_history = _best_count(*pooled)
    history_prior, j, validation_prior = 0.0, 0, None
    if new is not None and new[3] is not None:
        served_as_gated = (
            np.where(evidence < min_history, mine + gain, mine) if inline else mine[:0]
        )
        if inline:
            validation_prior = _prior_metrics(model, where["histories"], relevant[users], metric, k)
        if not inline or validation_prior is not None:
            history_prior, j = _learn_prior(
                np.r_[served_as_gated, np.where(new[0] < min_history, new[1] + new[2], new[1])],
                new[3] if validation_prior is None else np.c_[validation_prior, new[3]],
            )
    if history_prior:
        min_history = 0  # the blend answers short histories in the gate's place
    gate = min_history if inline and min_history >= 0 else min_events
    out = {
        "min_events": min_events,
        "min_history": min_history,
        "history_prior": history_prior,
        "user_prior": user_prior,
        "users": int(users.size),
        "gated": int((evidence < gate).sum()),
        "value": float(mine.mean()),
        "gated_value": float((mine.sum() + gain[evidence < gate].sum()) / mine.size),
    }
    if user_prior:  # the validation users (known ones) are blended, none gated
        assert blended is not None
        out["gated"] = 0
        out["gated_value"] = float(np.nanmean(blended[ju]))
    if new is None:
        return out | unknown
    new_evidence, new_mine, new_gain, new_prior = new
    served = np.where(new_evidence < min_history, new_mine + new_gain, new_mine)
    if history_prior:
        assert new_prior is not None
        served = new_prior[j][~np.isnan(new_prior[j])]
        if validation_prior is not None:  # the validation users are histories: blended too
            out["gated"] = 0
            out["gated_value"] = float(np.nanmean(validation_prior[j]))
    return out | {
        "new_histories": int(new_mine.size),
        "new_gated": int((new_evidence < min_history).sum()),
        "new_value": float(new_mine.mean()),
        "new_gated_value": float(served.mean()),
    }


def _gate(
    r: AlgoResult,
    split: Split,
    metric: str,
    k: int,
    threshold: float | None,
    threads: int,
    history_given: bool = False,
    by_time: bool = False,
    known_prior: bool = True,
) -> None:
    """Learn r's gates (learn_min_events) and add them to its best params (not
    min_history when it was given; user_prior only with `known_prior`)."""
    try:
        r.gate = learn_min_events(
            r.algorithm,
            r.best_params,
            split,
            metric,
            k,
            threshold,
            threads,
            by_time=by_time,
            known_prior=known_prior,
        )
    except (ValueError, TrainingError) as exc:  # the search's fits worked: say, go on ungated
        log.warning("tune %s: min_events not learned: %s", r.algorithm, exc)
        return
    g = r.gate
    if g["value"] is None:
        return  # nothing to learn from (a rating metric, popularity, no held-out user)
    learned = {"min_events": g["min_events"]} if g["min_events"] else {}
    if g["min_history"] not in (-1, g["min_events"]) and not history_given:
        learned["min_history"] = g["min_history"]  # else it follows min_events
    if g["history_prior"] and not history_given:
        learned["history_prior"] = g["history_prior"]
    if g.get("user_prior"):
        learned["user_prior"] = g["user_prior"]
    r.best_params = {**r.best_params, **learned}
    if g.get("user_prior"):
        log.info(
            "tune %s: user_prior=%g: %d validation users blended with popularity, "
            "%.4f -> %.4f (no min_events gate)",
            r.algorithm,
            g["user_prior"],
            g["users"],
            g["value"],
            g["gated_value"],
        )
    lengths = f"{NEW_USER_LENGTHS[0]}-{NEW_USER_LENGTHS[-1]}"
    if not (g["min_events"] or g["min_history"] > 0 or g["gated"] or g["history_prior"]):
        if g.get("user_prior"):
            return  # said above; new users follow min_history (-1: as min_events, 0)
        log.info(
            "tune %s: no min_events or min_history gate: popularity does not clearly beat it "
            "for users with few events (%d validation users; %d histories of %s events of "
            "new users)",
            r.algorithm,
            g["users"],
            g["new_histories"],
            lengths,
        )
        return
    new = "too few users to make new ones: min_history follows min_events"
    if history_given:
        new = f"min_history={r.best_params['min_history']} as given"
    elif g["history_prior"]:
        new = (
            f"history_prior={g['history_prior']:g}: {g['new_histories']} histories of "
            f"{lengths} events of new users blended with popularity, "
            f"{g['new_value']:.4f} -> {g['new_gated_value']:.4f}"
        )
    elif g["new_histories"]:
        new = (
            f"min_history={g['min_history']}: {g['new_gated']} of {g['new_histories']} "
            f"histories of {lengths} events of new users gated, "
            f"{g['new_value']:.4f} -> {g['new_gated_value']:.4f}"
        )
    log.info(
        "tune %s: min_events=%d: %d of %d validation users gated, %s %.4f -> %.4f "
        "(popularity answers below a gate); %s",
        r.algorithm,
        g["min_events"],
        g["gated"],
        g["users"],
        metric,
        g["value"],
        g["gated_value"],
        new,
    )


@dataclass
class AlgoResult:
    """One algorithm's search: every trial, the best, the time taken."""

    algorithm: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best_params: dict[str, Any] = field(default_factory=dict)
    best_value: float | None = None
    default_value: float | None = None
    seconds: float = 0.0
    interrupted: bool = False
    error: str | None = None  # why it could not be fitted on this data at all
    gate: dict[str, Any] | None = None  # learn_min_events' result for the best params

    def served_value(self) -> float | None:
        """The best trial's validation value as served: with the learned
        gate (users below it answered by popularity) and, where the validation
        users are histories, the learned history_prior."""
        g = self.gate
        if self.best_value is None or not g or g["value"] is None:
            return self.best_value
        if not g["gated"] and g["gated_value"] == g["value"]:  # nothing changed (no rounding)
            return self.best_value
        return self.best_value + g["gated_value"] - g["value"]

    def record(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "error": self.error,
            "best_params": self.best_params,
            "best_value": self.best_value,
            "min_events": self.gate,
            "default_value": self.default_value,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
            "trials": self.trials,
        }


def _short(v: Any) -> str:
    """A trial's value or parameter for the log: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class _Bar:
    """A tqdm bar per search showing the best value so far (on stderr, when a
    tty); without a terminal, one log line per trial instead. The models'
    own per-fit log lines are held back meanwhile."""

    def __init__(self, total: int, desc: str, disable: bool | None) -> None:
        from tqdm import tqdm

        self.desc = desc
        self.bar = tqdm(total=total, desc=desc, unit="trial", file=sys.stderr, disable=disable)
        self._quiet = [logging.getLogger(n) for n in ("recserve.models", "recserve.evaluation")]
        self._levels = [q.level for q in self._quiet]
        for q in self._quiet:
            q.setLevel(logging.WARNING)

    def __call__(self, study: Any, trial: Any) -> None:
        self.bar.update()
        best = None
        with contextlib.suppress(ValueError):  # no complete trial yet
            best = study.best_value
            self.bar.set_postfix(best=f"{best:.4f}", refresh=False)
        if self.bar.disable:
            # What was tried and how long it took, so a slow or poor region of
            # the search is visible in the log while it runs.
            seconds = trial.duration.total_seconds() if trial.duration is not None else 0.0
            params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
            log.info(
                "%s: trial %d %s value=%s best=%s (%.1fs%s)",
                self.desc,
                trial.number,
                trial.state.name.lower(),
                _short(trial.value),
                _short(best),
                seconds,
                f"; {params}" if params else "",
            )

    def close(self) -> None:
        self.bar.close()
        for q, level in zip(self._quiet, self._levels, strict=True):
            q.setLevel(level)


def search(
    algorithm: str,
    split: Split,
    metric: str,
    k: int,
    trials: int,
    seed: int,
    fixed: Mapping[str, Any] | None = None,
    timeout: float | None = None,
    threshold: float | None = None,
    threads: int = 0,
    progress: bool | None = None,
) -> AlgoResult:
    """Search one algorithm's parameters on a split; Ctrl-C ends it early, keeping
    every trial completed so far (`interrupted` says so)."""
    optuna = _optuna()
    cls = MODELS.get(algorithm)
    if cls is None:
        raise ValueError(f"algo: unknown algorithm {algorithm!r} (known: {', '.join(MODELS)})")
    probe = create(algorithm, **dict(fixed or {}))  # bad fixed params fail before any trial
    fixed = {n: probe.params[n] for n in dict(fixed or {})}  # parsed ("30" -> 30)
    # What this data cannot support stays at the class's choice (unless given).
    fixed = {**cls.fixed_by_data(split.train), **fixed}
    params = space(cls, fixed)
    direction = "minimize" if metric in MINIMIZE else "maximize"
    study = optuna.create_study(
        direction=direction,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0),
    )
    if params:
        defaults = cls.defaults_on(split.train)  # what `train` would fit with
        study.enqueue_trial({n: defaults[n] for n in params})
    budget = cls.budget_param if cls.budget_param in params or cls.budget_param in fixed else ""

    def make(values: Mapping[str, Any]) -> Recommender:
        model = create(algorithm, **{**fixed, **values})
        model.n_threads = threads
        return model

    unfit: list[ValueError] = []

    def objective(trial: Any) -> float:
        values = {n: suggest(trial, n, p) for n, p in params.items()}
        model = make(values)
        try:
            if budget and model.params[budget] >= RUNG:
                low = make({**values, budget: max(1, model.params[budget] // RUNG)})
                trial.report(score(low, split, metric, k, threshold), 0)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            return score(model, split, metric, k, threshold)
        except TrainingError:  # diverged: a failed trial (optuna's catch below)
            raise
        except ValueError as exc:
            # The data cannot be fitted with these values. On the first trial
            # (the defaults) that is the algorithm on this data, so the search
            # stops and says why; later, a corner of the space, skipped.
            unfit.append(exc)
            if trial.number == 0:
                trial.study.stop()
            else:
                log.warning("tune %s: trial %d not fitted: %s", algorithm, trial.number, exc)
            raise optuna.TrialPruned(str(exc)) from None

    out = AlgoResult(algorithm)
    n_trials = trials if params else 1
    bar = _Bar(n_trials, f"tune {algorithm}", None if progress is None else not progress)
    t0 = time.perf_counter()
    try:
        # A trial whose parameters make training diverge is recorded as failed
        # (optuna logs why) and the search goes on: the space holds such corners.
        study.optimize(
            objective, n_trials=n_trials, timeout=timeout, callbacks=[bar], catch=(TrainingError,)
        )
    except KeyboardInterrupt:
        out.interrupted = True
        log.warning(
            "tune %s: interrupted after %d trials; keeping the best", algorithm, len(study.trials)
        )
    finally:
        bar.close()
    out.seconds = time.perf_counter() - t0
    for t in study.trials:
        out.trials.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "params": dict(t.params),
                "value": t.value,
                "seconds": (
                    round((t.datetime_complete - t.datetime_start).total_seconds(), 3)
                    if t.datetime_complete and t.datetime_start
                    else None
                ),
            }
        )
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete and unfit and not out.interrupted:
        raise unfit[0]
    if complete:
        best = study.best_trial
        out.best_params = {**fixed, **best.params}
        out.best_value = float(best.value)
        first = study.trials[0]
        if params and first.state.name == "COMPLETE":
            out.default_value = float(first.value)
    return out


def better(metric: str, a: float, b: float) -> bool:
    """Whether metric value a beats b."""
    return a < b if metric in MINIMIZE else a > b


# -- learned hybrid weights --------------------------------------------------------------


@dataclass
class Candidates:
    """Each component's top-n items and min-max-normalized scores for the
    validation users, scored once; `blend` re-ranks them for any weights."""

    names: list[str]
    items: list[np.ndarray]  # per component: (users, n) item indices, -1 = none
    scores: list[np.ndarray]  # per component: (users, n) scores in [0, 1]
    relevant: Any  # (users, items) held-out interactions of these users
    n_items: int

    def blend(self, weights: Sequence[float], k: int) -> np.ndarray:
        """Top-k item indices per user of the weighted blend (the server's blend:
        summed weighted normalized scores, added in component order, ties by
        smaller item index; -1 past a user's candidates). It works on the
        candidates alone (sorted keys, not a users x items matrix): a trial on
        a 30,000-item catalogue took 31 s as dense rows, 2.6 s this way."""
        n_users = self.relevant.shape[0]
        out = np.full((n_users, k), -1, np.int64)
        parts = [
            (w, it, s) for w, it, s in zip(weights, self.items, self.scores, strict=True) if w > 0
        ]
        if not parts or k <= 0 or n_users == 0:
            return out
        width = sum(it.shape[1] for _, it, _ in parts)
        step = max(1, (1 << 20) // width)
        span = self.n_items + 1  # item n_items: no candidate
        for lo in range(0, n_users, step):
            hi = min(lo + step, n_users)
            items = np.concatenate([it[lo:hi] for _, it, _ in parts], axis=1)
            vals = np.concatenate([w * s[lo:hi] for w, _, s in parts], axis=1).ravel()
            keys = np.where(items >= 0, items, self.n_items)
            keys += span * np.arange(hi - lo, dtype=np.int64)[:, None]
            order = np.argsort(keys.ravel(), kind="stable")
            keys, vals = keys.ravel()[order], vals[order]
            start = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
            length = np.diff(np.r_[start, keys.size])
            total = vals[start]
            for j in range(1, int(length.max())):  # in component order, as the server adds
                more = length > j
                total[more] += vals[start[more] + j]
            row, item = np.divmod(keys[start], span)
            real = item < self.n_items
            row, item, total = row[real], item[real], total[real]
            first = np.searchsorted(row, np.arange(hi - lo + 1))
            if width > k:  # only items at or above each row's k-th best total can place
                pad = np.full((hi - lo, width), -np.inf)
                pad[row, np.arange(row.size) - first[row]] = total
                kth = -np.partition(-pad, k - 1, axis=1)[:, k - 1]
                top = total >= kth[row]
                row, item, total = row[top], item[top], total[top]
                first = np.searchsorted(row, np.arange(hi - lo + 1))
            order = np.lexsort((item, -total, row))
            row, item = row[order], item[order]
            rank = np.arange(row.size) - first[row]
            keep = rank < k
            out[lo + row[keep], rank[keep]] = item[keep]
        return out


def candidates(models: Mapping[str, Recommender], split: Split, n: int) -> Candidates:
    """Fit each component on the split's training part and score its top-n for
    every user with a held-out item."""
    relevant = split.test.tocsr().copy()
    relevant.data = (relevant.data > 0).astype(np.float32)  # as evaluate(): no dislikes
    relevant.eliminate_zeros()
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    names, items, scores = [], [], []
    for name, model in models.items():
        model.fit(split.train)
        if split.fold_in is not None:
            it, sc = model.recommend_histories(split.fold_in[users], min(n, model.n_items))
        else:
            it, sc = model.recommend(users, min(n, model.n_items))
        if model.sparse_scores:  # as the server blends: only the items its evidence reached
            it = np.where(sc > 0, it, -1)
        # as the server: a user below the gate leaves this component out
        if split.fold_in is not None and model.history_gate():
            counts = evidence_counts(model, histories=split.fold_in[users])
            it[counts < model.history_gate()] = -1
        elif split.fold_in is None and model.params.get("min_events", 0):
            it[evidence_counts(model, users=users) < model.params["min_events"]] = -1
        names.append(name)
        items.append(it.astype(np.int64))
        scores.append(_minmax_rows(it, sc))
    return Candidates(names, items, scores, relevant[users], split.train.n_items)


def _history_candidates(
    model: Recommender, histories: sp.csr_matrix, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A hybrid component's top-n for inline histories as the server blends
    them: (items, min-max-normalized scores, whether the component answers
    each row: not below its gate, with evidence); only reached items for a
    sparse model, none for a row it does not answer."""
    items, scores = model.recommend_histories(histories, min(n, model.n_items))
    if model.sparse_scores:
        items = np.where(scores > 0, items, -1)
    used = np.ones(histories.shape[0], bool)  # a model serving cold users answers all
    if not model.serves_cold:
        used = evidence_counts(model, histories=histories) >= max(model.history_gate(), 1)
    items = np.where(used[:, None], items, -1).astype(np.int64)
    return items, _minmax_rows(items, scores), used


def _popular_candidates(counts: np.ndarray, histories: sp.csr_matrix, n: int) -> np.ndarray:
    """The n items with the most training interactions (ties by index) outside
    each history: a hybrid's popularity part for new users (_prior_part)."""
    order = popular_order(counts)
    out = np.full((histories.shape[0], min(n, counts.size)), -1, np.int64)
    for r in range(histories.shape[0]):
        seen = histories.indices[histories.indptr[r] : histories.indptr[r + 1]]
        head = order[: out.shape[1] + seen.size]
        head = head[~np.isin(head, seen)][: out.shape[1]]
        out[r, : head.size] = head
    return out


def learn_hybrid_prior(
    specs: Mapping[str, tuple[str, Mapping[str, Any]]],
    weights: Mapping[str, float],
    train: Dataset,
    metric: str,
    k: int,
    *,
    threshold: float | None = None,
    by_time: bool = False,
    threads: int = 0,
    prune: Sequence[str] = (),
) -> dict[str, Any]:
    """A hybrid's `history_prior`: the c of PRIOR_GRID whose blend of
    popularity into new users' answers (weight c / (c + n) for n events, the
    components' weights scaled to the rest, as the router's _prior_part)
    scores best on users held out of one more fit of every component
    (`new_user_histories` of `train`), each folded in from 1 to 5 of its
    events; kept only when it beats the hybrid without it clearly (paired z
    >= GATE_Z). `specs`: each component's (algorithm, params).

    `prune`: components the known users can do without (prunable), in the
    order they would be left out: the longest head of it whose leaving out
    the new users' answers (each with its own learned prior) can bear too
    (_bearable) is "pruned", and the prior is learned for the rest.

    Returns {"history_prior", "new_histories", "new_value" (the hybrid
    without a prior on those histories), "new_prior_value", "pruned",
    "new_full_value" (the answers of every component, as served)}."""
    out: dict[str, Any] = {"history_prior": 0.0, "new_histories": 0}
    out |= {"new_value": None, "new_prior_value": None, "pruned": [], "new_full_value": None}
    if metric in MINIMIZE:
        return out
    made = new_user_histories(train, threshold, by_time=by_time)
    if made is None:
        return out
    rest, events, relevant = made
    names = sorted(specs)  # the order hybrids.json gives them back: the first's counts
    models = {}
    for c in names:
        models[c] = create(specs[c][0], **specs[c][1])
        models[c].n_threads = threads
        models[c].fit(rest)
    first = models[names[0]]
    # every component, then each longer head of `prune` left out (weight 0: as absent)
    sets = [[float(weights.get(c, 0.0)) for c in names]]
    for i in range(len(prune)):
        left_out = prune[: i + 1]
        sets.append([0.0 if c in left_out else w for c, w in zip(names, sets[0], strict=True)])
    grid = (0.0, *PRIOR_GRID)
    answers: list[list[list[np.ndarray]]] = [[[] for _ in grid] for _ in sets]
    n = max(3 * k, 100)
    # each set's first component (as served: its counts and its evidence)
    heads = [models[names[next((i for i, x in enumerate(w) if x > 0), 0)]] for w in sets]
    for hist, truth in _new_user_cases(first, events, relevant):
        parts = [_history_candidates(models[c], hist, n) for c in names]
        evidence = {id(m): evidence_counts(m, histories=hist) for m in heads}
        for s, (w, head) in enumerate(zip(sets, heads, strict=True)):
            recs = _answers_with_prior(head, parts, w, hist, evidence[id(head)], k, grid)
            for j, x in enumerate(recs):
                answers[s][j].append(user_metrics(x, truth, [k], first.n_items)[0][metric])
    if not answers[0][0]:
        return out
    learned = []  # per weight set: (prior, per-user scores as served, without a prior, blended)
    for per_prior in answers:
        alone = np.concatenate(per_prior[0])
        blended = np.array([np.concatenate(b) for b in per_prior[1:]])
        j = int(np.argmax(blended.mean(axis=1)))
        if _z(blended[j] - alone) >= GATE_Z:
            learned.append((PRIOR_GRID[j], blended[j], alone))
        else:
            learned.append((0.0, alone, alone))
    s = max([i for i in range(1, len(sets)) if _bearable(learned[0][1], learned[i][1])], default=0)
    c, served, alone = learned[s]
    out |= {"new_histories": int(alone.size), "new_value": float(alone.mean())}
    out |= {"pruned": list(prune[:s]), "new_full_value": float(learned[0][1].mean())}
    if c:
        out |= {"history_prior": c, "new_prior_value": float(served.mean())}
    return out


# Validation users a hybrid's user_prior is scored on at most (evenly spaced).
USER_PRIOR_MAX = 20_000


def learn_user_prior(
    models: Mapping[str, Recommender],
    weights: Mapping[str, float],
    split: Split,
    metric: str,
    k: int,
) -> dict[str, Any]:
    """A hybrid's `user_prior`: the c of PRIOR_GRID whose blend of popularity
    into known users' answers (weight c / (c + n) for n training events, as
    the router's _prior_of) scores best on the validation users (at most
    USER_PRIOR_MAX), kept only when it beats the hybrid without it clearly
    (paired z >= GATE_Z). `models`: the components fitted on the split's
    training part. Nothing is learned where the validation users are inline
    histories (users protocol: history_prior answers them).

    Returns {"user_prior", "known_users", "known_value" (the hybrid without
    it), "known_prior_value"}."""
    out: dict[str, Any] = {"user_prior": 0.0, "known_users": 0}
    out |= {"known_value": None, "known_prior_value": None}
    if metric in MINIMIZE or split.fold_in is not None:
        return out
    relevant = split.test.tocsr().copy()
    relevant.data = (relevant.data > 0).astype(np.float32)  # as candidates()
    relevant.eliminate_zeros()
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    if users.size > USER_PRIOR_MAX:
        users = users[np.linspace(0, users.size - 1, USER_PRIOR_MAX).astype(np.int64)]
    if users.size == 0:
        return out
    names = sorted(models)  # the order hybrids.json gives them back: the first's counts
    answers = hybrid_user_answers(
        [models[c] for c in names],
        [float(weights.get(c, 0.0)) for c in names],
        users,
        k,
        (0.0, *PRIOR_GRID),
    )
    n_items = models[names[0]].n_items
    scored = np.array([user_metrics(x, relevant[users], [k], n_items)[0][metric] for x in answers])
    j = int(np.argmax(scored[1:].mean(axis=1)))
    out |= {"known_users": int(users.size), "known_value": float(scored[0].mean())}
    if _z(scored[1 + j] - scored[0]) >= GATE_Z:
        out |= {"user_prior": PRIOR_GRID[j], "known_prior_value": float(scored[1 + j].mean())}
    return out


def hybrid_history_answers(
    models: Sequence[Recommender],
    weights: Sequence[float],
    histories: sp.csr_matrix,
    k: int,
    priors: Sequence[float],
) -> list[np.ndarray]:
    """A hybrid's top-k for new users' inline histories as the router serves
    them, under each history_prior c of `priors` (0: none): `models` in the
    hybrid's order, all fitted on one catalogue (_answers_with_prior). Returns
    one (histories, k) array per prior, -1 past a row's candidates."""
    n = max(3 * k, 100)
    parts = [_history_candidates(m, histories, n) for m in models]
    evidence = evidence_counts(models[0], histories=histories)
    return _answers_with_prior(models[0], parts, weights, histories, evidence, k, priors)


def hybrid_user_answers(
    models: Sequence[Recommender],
    weights: Sequence[float],
    users: np.ndarray,
    k: int,
    priors: Sequence[float],
) -> list[np.ndarray]:
    """hybrid_history_answers for known users (indices in every model's
    shared user map) under each user_prior c of `priors`: n is a user's
    training events as the first model counts them; a component the user is
    below the `min_events` gate of is left out."""
    n = max(3 * k, 100)
    parts = []
    for m in models:
        items, scores = m.recommend(users, min(n, m.n_items))
        if m.sparse_scores:
            items = np.where(scores > 0, items, -1)
        used = np.ones(users.size, bool)
        if m.params.get("min_events", 0):
            used = evidence_counts(m, users=users) >= m.params["min_events"]
        items = np.where(used[:, None], items, -1).astype(np.int64)
        parts.append((items, _minmax_rows(items, scores), used))
    first = models[0]
    assert first.user_items is not None
    seen = first.user_items[users]
    evidence = evidence_counts(first, users=users)
    return _answers_with_prior(first, parts, weights, seen, evidence, k, priors)


def _answers_with_prior(
    first: Recommender,
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    weights: Sequence[float],
    seen: sp.csr_matrix,
    evidence: np.ndarray,
    k: int,
    priors: Sequence[float],
) -> list[np.ndarray]:
    """The router's hybrid blend with popularity for each prior c of `priors`
    (0: none), offline: each component's candidates (`parts`: items,
    min-max-normalized scores, whether it answers the row) and popularity's
    (`first`'s training counts, its best max(3k, 100) items outside each
    row's `seen` ones, min-max normalized), popularity weighted c / (c + n)
    (n: `evidence` per row), the answering components' weights scaled to the
    rest. A row no component answers (all gated) gets popularity's answer,
    as the chain's fallback gives it."""
    assert first.user_items is not None
    counts = liked_counts(first.user_items).astype(np.float64)
    n = max(3 * k, 100)
    w = np.asarray(weights, np.float64)
    pop = _popular_candidates(counts, seen, n)
    cands = Candidates(
        [str(i) for i in range(len(parts) + 1)],
        [p[0] for p in parts] + [pop],
        [p[1] for p in parts] + [_minmax_rows(pop, counts[np.maximum(pop, 0)])],
        sp.csr_matrix((seen.shape[0], first.n_items)),
        first.n_items,
    )
    answered = (np.array([p[2] for p in parts]).T * w).sum(axis=1)  # W per row
    fallback = answered <= 0  # no component answers: the chain's popularity, either way
    top = min(k, pop.shape[1])
    out = []
    for c in priors:
        if c <= 0:
            recs = cands.blend([*w, 0.0], k)
        else:
            a = np.array([prior_weight(c, int(e)) for e in evidence])
            scale = np.where(fallback, 0.0, (1.0 - a) / np.where(fallback, 1.0, answered))
            scaled = Candidates(
                cands.names,
                cands.items,
                [s * (wc * scale)[:, None] for s, wc in zip(cands.scores[:-1], w, strict=True)]
                + [cands.scores[-1] * np.where(fallback, 0.0, a)[:, None]],
                cands.relevant,
                cands.n_items,
            )
            recs = scaled.blend([1.0] * len(cands.names), k)
        recs[fallback, :top] = pop[fallback, :top]
        out.append(recs)
    return out


def _minmax_rows(items: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """serving.blend.minmax of each row's candidates (items >= 0), all rows at
    once (one call per user cost seconds on 100,000 users); 0 elsewhere."""
    ok = items >= 0
    s = np.asarray(scores, np.float64)
    lo = np.where(ok, s, np.inf).min(axis=1, keepdims=True, initial=np.inf)
    hi = np.where(ok, s, -np.inf).max(axis=1, keepdims=True, initial=-np.inf)
    span = hi - lo
    flat = ~(span > 0)  # all equal (or no candidate): 1, as minmax
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(flat, 1.0, (s - lo) / np.where(flat, 1.0, span))
    return np.where(ok, norm, 0.0)


def fit_weights(
    cands: Candidates,
    metric: str,
    k: int,
    trials: int,
    seed: int,
    start: Sequence[Mapping[str, float]] = (),
    progress: bool | None = None,
) -> AlgoResult:
    """Search blend weights (each in [0, 1], reported normalized to sum 1)."""
    if metric in MINIMIZE:
        raise ValueError(f"metric: hybrid weights are fitted on a ranking metric, not {metric}")
    names = cands.names
    if len(names) == 1:  # one component: every weight ranks alike; its priors are what is learned
        out = AlgoResult("hybrid")
        recs = cands.blend([1.0], k)
        value = float(ranking_metrics(recs, cands.relevant, [k], cands.n_items)[metric])
        out.best_params, out.best_value = {names[0]: 1.0}, value
        out.trials = [{"number": 0, "state": "complete", "params": {names[0]: 1.0}, "value": value}]
        return out
    optuna = _optuna()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    for weights in (*start, dict.fromkeys(names, 1.0)):
        study.enqueue_trial({n: float(weights.get(n, 0.0)) for n in names})

    def objective(trial: Any) -> float:
        w = [trial.suggest_float(n, 0.0, 1.0) for n in names]
        if sum(w) <= 0:
            return 0.0
        recs = cands.blend(w, k)
        return ranking_metrics(recs, cands.relevant, [k], cands.n_items)[metric]

    out = AlgoResult("hybrid")
    bar = _Bar(trials, "tune hybrid", None if progress is None else not progress)
    t0 = time.perf_counter()
    try:
        study.optimize(objective, n_trials=trials, callbacks=[bar])
    except KeyboardInterrupt:
        out.interrupted = True
    finally:
        bar.close()
    out.seconds = time.perf_counter() - t0
    out.trials = [
        {"number": t.number, "state": t.state.name.lower(), "params": t.params, "value": t.value}
        for t in study.trials
    ]
    if any(t.state.name == "COMPLETE" for t in study.trials):
        best = study.best_trial.params
        total = sum(best.values()) or 1.0
        out.best_params = {n: round(best[n] / total, 6) for n in names}
        out.best_value = float(study.best_value)
        if start and study.trials[0].state.name == "COMPLETE":
            out.default_value = float(study.trials[0].value)
    return out


def component(models_dir: Path, name: str) -> tuple[str, dict[str, Any], str]:
    """(algorithm, params, version) of a component: the published bundle `name`
    if there is one, else the algorithm `name` with its defaults."""
    try:
        doc = bundle.read_manifest(bundle.resolve(models_dir, name))
        return str(doc["algorithm"]), dict(doc.get("params", {})), str(doc.get("version", ""))
    except (bundle.BundleError, FileNotFoundError, KeyError):
        if name not in MODELS:
            raise ValueError(
                f"hybrid: {name!r} is neither a published model in {models_dir} "
                f"nor an algorithm ({', '.join(MODELS)})"
            ) from None
        return name, {}, ""


def read_hybrids(models_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The learned hybrids of a models folder ({} when none were learned)."""
    path = Path(models_dir) / HYBRIDS_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable learned hybrids ({exc})") from None
    if not isinstance(doc, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("weights"), dict) for v in doc.values()
    ):
        raise ValueError(f"{path}: expected {{name: {{weights: {{model: weight}}, ...}}}}")
    return doc


def write_hybrid(models_dir: str | Path, name: str, entry: Mapping[str, Any]) -> Path:
    """Add or replace one learned hybrid, atomically (write, fsync, rename)."""
    bundle.check_name(name)
    path = Path(models_dir) / HYBRIDS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = read_hybrids(models_dir)
    doc[name] = dict(entry)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


# -- the two commands ------------------------------------------------------------------


def tune(
    ds: Dataset,
    algos: Sequence[str],
    *,
    name: str,
    models_dir: str | Path,
    trials: int = 30,
    metric: str = "ndcg@20",
    protocol: str = "random",
    fraction: float = 0.2,
    seed: int = 0,
    leave_last: int = 1,
    threshold: float | None = None,
    minutes: float | None = None,
    fixed: Mapping[str, Any] | None = None,
    threads: int = 0,
    progress: bool | None = None,
    split: Split | None = None,
) -> dict[str, Any]:
    """Search each algorithm on the validation split, pick the best, measure it
    once on evaluate's held-out test (which the search never saw: the figure to
    quote, the validation one being chosen on), retrain it on all the data and
    publish it as `name` with the search record in its manifest. `split`: a
    given split (evaluate --test) in place of evaluate's. Ctrl-C stops the
    search and publishes the best so far."""
    bundle.check_name(name)
    if trials < 1:
        raise ValueError(f"trials: must be >= 1, got {trials}")
    if minutes is not None and not minutes > 0:  # NaN too: no trial would ever run
        raise ValueError(f"minutes: must be > 0, got {minutes}")
    if not algos:
        raise ValueError("algo: give at least one algorithm")
    if fixed and len(algos) > 1:
        raise ValueError("param: fixed --param values need a single --algo")
    for a in algos:
        if a not in MODELS:
            raise ValueError(f"algo: unknown algorithm {a!r} (known: {', '.join(MODELS)})")
    metric, k = check_metric(metric)
    t0 = time.perf_counter()
    deadline = None if minutes is None else time.monotonic() + 60 * minutes
    outer, inner = splits(ds, protocol, fraction, seed, leave_last, split)
    check_validation(inner, metric, threshold, protocol, fraction)
    results: list[AlgoResult] = []
    for i, algo in enumerate(algos):
        timeout = None
        if deadline is not None:
            timeout = max(0.0, deadline - time.monotonic()) / (len(algos) - i)
        try:
            r = search(
                algo, inner, metric, k, trials, seed, fixed, timeout, threshold, threads, progress
            )
        except ValueError as exc:
            if len(algos) == 1:
                raise
            # One algorithm this data cannot fit (content without item
            # features, a metric it does not report) costs the others nothing,
            # as in evaluate --compare.
            log.error("tune %s: not searched: %s", algo, exc)
            results.append(AlgoResult(algo, error=str(exc)))
            continue
        results.append(r)
        log.info(
            "tune %s: best %s=%s after %d trials (defaults: %s)",
            algo,
            metric,
            _short(r.best_value),
            len(r.trials),
            _short(r.default_value),
        )
        if r.interrupted:
            break
    done = [r for r in results if r.best_value is not None]
    if not done:
        why = "; ".join(f"{r.algorithm}: {r.error}" for r in results if r.error)
        raise ValueError(f"tune: no trial completed; nothing published{f' ({why})' if why else ''}")
    if "min_events" not in dict(fixed or {}):  # a given min_events: neither gate is learned
        for r in done:
            given = bool({"min_history", "history_prior"} & set(dict(fixed or {})))
            known = "user_prior" not in dict(fixed or {})  # a given user_prior stays
            _gate(r, inner, metric, k, threshold, threads, given, protocol == "temporal", known)
    best = done[0]
    for r in done[1:]:  # as served: with each one's gate
        if better(metric, r.served_value(), best.served_value()):  # type: ignore[arg-type]
            best = r
    gate = best.gate
    held_out = create(best.algorithm, **best.best_params)
    held_out.n_threads = threads
    test_value = score(held_out, outer, metric, k, threshold)
    log.info(
        "tune: %s best, %s %.4f on validation, %.4f on the held-out test",
        best.algorithm,
        metric,
        best.served_value(),
        test_value,
    )
    floor = popularity_floor(outer, metric, k, threshold)
    if floor is not None:
        hint = (
            "More trials may close the gap; with popularity among the algorithms "
            f"(--algo {','.join(dict.fromkeys([*algos, 'popularity']))}) the search "
            "publishes popularity when nothing beats it"
        )
        gap = popularity_gap(name, best.algorithm, metric, test_value, floor, hint)
        if gap is not None:
            log.log(*gap)
    model = create(best.algorithm, **best.best_params)
    model.n_threads = threads
    model.fit(ds)  # all the data: what serves
    record = {
        "metric": metric,
        "protocol": protocol,
        "fraction": fraction,
        "seed": seed,
        "leave_last": leave_last,
        "threshold": threshold,
        "validation_events": int(inner.test.nnz),
        "evaluate_test_events": int(outer.test.nnz),  # never seen by the search
        "test": test_value,
        "popularity_test": floor,  # the same metric, held-out test (None: not ranked)
        "min_events": gate,  # learned on the validation split (None: given or not learned)
        "given_split": split is not None,
        "data_fingerprint": ds.fingerprint(),
        "seconds": round(time.perf_counter() - t0, 3),
        "interrupted": any(r.interrupted for r in results),
        "best": {
            "algorithm": best.algorithm,
            "params": best.best_params,
            "value": best.best_value,
        },
        "algorithms": [r.record() for r in results],
    }
    path = model.save(
        models_dir, name, metrics={metric: best.served_value()}, dataset=ds, tuning=record
    )
    doc = bundle.read_manifest(path)
    return {
        "name": name,
        "version": doc["version"],
        "path": str(path),
        "algorithm": best.algorithm,
        "params": best.best_params,
        "metric": metric,
        "validation": best.served_value(),
        "test": test_value,
        "popularity_test": floor,
        "defaults": {r.algorithm: r.default_value for r in results},
        "best_by_algorithm": {r.algorithm: r.served_value() for r in results},
        "trials": {r.algorithm: len(r.trials) for r in results},
        "interrupted": record["interrupted"],
        "seconds": record["seconds"],
    }


def tune_hybrid(
    ds: Dataset,
    components: Sequence[str],
    *,
    name: str,
    models_dir: str | Path,
    trials: int = 50,
    metric: str = "ndcg@20",
    protocol: str = "random",
    fraction: float = 0.2,
    seed: int = 0,
    leave_last: int = 1,
    threads: int = 0,
    progress: bool | None = None,
    prune: bool = True,
) -> dict[str, Any]:
    """Fit a hybrid's blend weights on the validation split, and its priors
    (learn_hybrid_prior, learn_user_prior), and write them to the models
    folder's hybrids.json, where `serve` reads hybrids. One component is a
    hybrid too: the model blended with popularity by its priors alone. With
    `prune`, a component whose leaving out neither the validation users nor
    new users' histories measurably feel (PRUNE_TOLERANCE) is left out:
    hybrids.json lists it under "dropped"."""
    bundle.check_name(name)
    models_dir = Path(models_dir)
    if not components or len(set(components)) != len(components):
        raise ValueError(f"hybrid: give one or more components, each once, got {list(components)}")
    if (models_dir / name).is_dir():
        raise ValueError(
            f"name: {name!r} is a published model in {models_dir}; name the hybrid apart"
        )
    metric, k = check_metric(metric)
    t0 = time.perf_counter()
    _, inner = splits(ds, protocol, fraction, seed, leave_last)
    check_validation(inner, metric, None, protocol, fraction)
    models, versions, specs = {}, {}, {}
    for c in components:
        algo, params, version = component(models_dir, c)
        models[c] = create(algo, **params)
        models[c].n_threads = threads
        versions[c] = version
        specs[c] = (algo, params)
    cands = candidates(models, inner, max(3 * k, 100))
    known = read_hybrids(models_dir).get(name, {})
    previous = known.get("weights")
    if previous and set(previous) | set(known.get("dropped", {})) == set(components):
        previous = {c: float(previous.get(c, 0.0)) for c in components}  # dropped: 0
    start = [previous] if previous and set(previous) == set(components) else []
    r = fit_weights(cands, metric, k, trials, seed, start, progress)
    if r.best_value is None:
        raise ValueError("tune: no trial completed; nothing written")
    log.info(
        "hybrid %s: learning its priors (one more fit of %s without held-out new users)",
        name,
        ", ".join(components),
    )
    drop, full = prunable(cands, r.best_params, metric, k) if prune else ([], None)
    prior = learn_hybrid_prior(
        specs,
        r.best_params,
        inner.train,
        metric,
        k,
        by_time=protocol == "temporal",
        threads=threads,
        prune=drop,
    )
    weights, value, dropped = r.best_params, r.best_value, {}
    if prior["pruned"]:
        dropped = {c: weights[c] for c in prior["pruned"]}
        total = sum(w for c, w in weights.items() if c not in dropped) or 1.0
        weights = {c: round(w / total, 6) for c, w in weights.items() if c not in dropped}
        recs = cands.blend([weights.get(c, 0.0) for c in cands.names], k)
        value = float(ranking_metrics(recs, cands.relevant, [k], cands.n_items)[metric])
        _log_pruned(name, metric, dropped, full, value, prior)
        versions = {c: v for c, v in versions.items() if c not in dropped}
    kept = {c: m for c, m in models.items() if c not in dropped}
    # Popularity on the same validation events: the floor the blend should clear.
    floor = popularity_floor(inner, metric, k, None)
    if floor is not None:
        hint = (
            "A blend ranks no better than its best component allows: `recserve evaluate "
            f"--compare {','.join([*components, 'popularity'])}` shows each on this data"
        )
        gap = popularity_gap(name, "hybrid", metric, value, floor, hint)
        if gap is not None:
            log.log(*gap)
    prior |= learn_user_prior(kept, weights, inner, metric, k)
    _log_hybrid_prior(name, metric, prior)
    prior.pop("pruned")
    entry = {
        "weights": weights,
        **prior,
        "dropped": dropped,
        "full_value": r.best_value,
        "metric": metric,
        "value": value,
        "equal_weights_value": _equal_weights_value(r),
        "popularity_value": floor,
        "components": versions,
        "protocol": protocol,
        "seed": seed,
        "data_fingerprint": ds.fingerprint(),
        "trials": len(r.trials),
        "seconds": round(time.perf_counter() - t0, 3),
        "interrupted": r.interrupted,
    }
    path = write_hybrid(models_dir, name, entry)
    return {"name": name, "path": str(path), **entry}


def _log_pruned(
    name: str,
    metric: str,
    dropped: Mapping[str, float],
    full: np.ndarray | None,
    value: float,
    prior: Mapping[str, Any],
) -> None:
    """Say which components a hybrid leaves out, and what the validation saw."""
    assert full is not None
    log.info(
        "hybrid %s: %s left out of the blend (weight %s): without %s, %s %.4f -> %.4f on "
        "validation users, %.4f -> %.4f on new users' histories, within %g%% (--keep-components "
        "keeps every component; each costs a dense row per served call)",
        name,
        ", ".join(dropped),
        ", ".join(f"{w:g}" for w in dropped.values()),
        "them" if len(dropped) > 1 else "it",
        metric,
        float(full.mean()),
        value,
        prior["new_full_value"],
        prior["new_prior_value"] if prior["history_prior"] else prior["new_value"],
        100 * PRUNE_TOLERANCE,
    )


def _log_hybrid_prior(name: str, metric: str, prior: Mapping[str, Any]) -> None:
    """One line on what the new users' histories taught the hybrid."""
    if not prior["new_histories"]:
        log.info("hybrid %s: too few users to hold out as new ones; no history_prior", name)
    elif prior["history_prior"]:
        log.info(
            "hybrid %s: history_prior=%g: %d new users' histories of 1-%d events, %s %.4f -> %.4f",
            name,
            prior["history_prior"],
            prior["new_histories"],
            NEW_USER_LENGTHS[-1],
            metric,
            prior["new_value"],
            prior["new_prior_value"],
        )
    else:
        log.info(
            "hybrid %s: no history_prior: popularity did not clearly help %d new users' "
            "histories (%s %.4f)",
            name,
            prior["new_histories"],
            metric,
            prior["new_value"],
        )
    if prior["user_prior"]:
        log.info(
            "hybrid %s: user_prior=%g: %d validation users, %s %.4f -> %.4f",
            name,
            prior["user_prior"],
            prior["known_users"],
            metric,
            prior["known_value"],
            prior["known_prior_value"],
        )
    elif prior["known_users"]:
        log.info(
            "hybrid %s: no user_prior: popularity did not clearly help %d validation users "
            "(%s %.4f)",
            name,
            prior["known_users"],
            metric,
            prior["known_value"],
        )
    else:
        log.info("hybrid %s: no user_prior: no known validation users to learn it on", name)


def _equal_weights_value(r: AlgoResult) -> float | None:
    """The validation metric of equal weights (always one of the first trials)."""
    for t in r.trials:
        if t["value"] is not None and len(set(t["params"].values())) == 1:
            return float(t["value"])
    return None
