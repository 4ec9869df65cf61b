"""The router: which model answers a request, for which user, with what.

1. name: "" -> the default model; an experiment -> its arm (hash of the id);
2. chain: the model, its fallbacks, the global fallbacks: the first one that
   is loaded and can serve this user answers (a hybrid is ready when all its
   components are);
3. user: a known id uses its training row, plus events recorded since (then
   it is folded in again); an unknown id with a history is folded in exactly
   as the model's recommend_from_history; a user with nothing (a known id the
   model learned nothing of, `is_cold`, included), or with fewer events than
   the model's `min_events`, goes on down the chain, to the first model that
   serves cold users (popularity), else to the popularity of the first loaded
   model's training data.

Answers are plain values (`recserve.serving.answers`); refusals are
`RequestError`s naming a status and the offending field.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from statistics import NormalDist
from typing import TypeVar

import numpy as np
import scipy.sparse as sp

from recserve.config import Hybrid, ServerConfig
from recserve.data import MAX_VALUE, IdMap
from recserve.feedback import OnlineState
from recserve.kernels import topk
from recserve.models import Recommender, bundle
from recserve.models.base import (
    KnownUserRow,
    ScratchPool,
    blend_popularity,
    fill_unreached,
    prior_weight,
    unpadded,
)
from recserve.models.registry import MODELS
from recserve.serving.answers import (
    MAX_ID_BYTES,
    Check,
    Prediction,
    Ranked,
    RecQuery,
    RequestError,
    check_id,
    invalid,
    nothing,
)
from recserve.serving.blend import blend, blend_dense, blend_rows
from recserve.serving.catalog import SERVING, Catalog, Slot

log = logging.getLogger("recserve.router")

BUILTIN = "builtin-popularity"
EXPLAIN_ITEMS = 3
# The empty history, shared (read-only: nothing may write into it).
_NO_IDX = np.zeros(0, np.int64)
_NO_VAL = np.zeros(0, np.float32)
_NO_IDX.flags.writeable = _NO_VAL.flags.writeable = False


def arm_key(q: RecQuery) -> str:
    """What an experiment hashes to pick a request's arm: the user id, or for an
    anonymous request (no user_id, only a history) its history's item ids, in
    order. With "" every anonymous request went to the same arm, whatever the
    fractions; a repeated request still gets the same arm."""
    if q.user_id:
        return q.user_id
    return "\x00history\x00" + "\x00".join(item for item, _ in q.history)


def assign_arm(salt: str, key: str, arms: dict[str, float]) -> str:
    """Deterministic arm of `key`: sha256(salt, key) as a uniform number in [0, 1)."""
    h = hashlib.sha256(salt.encode() + b"\x00" + key.encode("utf-8", "surrogatepass")).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    total = sum(arms.values())
    acc = 0.0
    names = [n for n in arms if arms[n] > 0]
    for name in names:
        acc += arms[name] / total
        if u < acc:
            return name
    return names[-1]


@dataclass
class _Served:
    """What one real model produced for a request, plus what explain/std need."""

    slot: Slot
    items: np.ndarray  # dense indices of the model
    scores: np.ndarray
    user: int  # -1 when folded in
    row: sp.csr_matrix | None  # the folded-in history row
    blended: bool = False  # blended with popularity (history_prior): final as it is

    @property
    def folded_in(self) -> bool:
        return self.row is not None


def _with_training_row(
    m: Recommender,
    user: int,
    idx: np.ndarray,
    val: np.ndarray,
    own: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A known user's training row (`own`, read when not given) followed by
    newer events (later values win)."""
    if user < 0:
        return idx, val
    own_idx, own_val = m.training_row(user) if own is None else own
    return np.concatenate([own_idx.astype(np.int64), idx]), np.concatenate([own_val, val])


def _same_row(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether two training rows (indices, values) are equal: components trained
    on the same data hold equal copies, read from their own bundles."""
    return (
        a[0].shape == b[0].shape
        and (a[0] is b[0] or np.array_equal(a[0], b[0]))
        and (a[1] is b[1] or np.array_equal(a[1], b[1]))
    )


def _history_row(m: Recommender, user: int, idx: np.ndarray, val: np.ndarray) -> sp.csr_matrix:
    """The row to fold in (_with_training_row's arrays), marked as continuing
    `user` when known (KnownUserRow: models fitted by SGD update that user's
    trained factors instead of starting from nothing)."""
    row = m.history_matrix([idx], [val])
    return KnownUserRow.of(row, user) if user >= 0 else row


def _no_evidence(m: Recommender, values: np.ndarray, known: bool) -> bool:
    """Whether a history tells the model nothing to rank by: empty, or only
    dislikes (negative values) for a model that learns from likes, or only
    values <= 0 for one whose history weighs by its values (a 0 weighs
    nothing), or fewer events than the model's gate (`min_events` for a
    `known` user, `min_history` for an inline one: where it ranks worse than
    popularity). Such a user goes on down the chain, as one with no history
    does; a model that serves cold users (popularity) answers anyway."""
    if m.serves_cold:
        return False
    if values.size == 0:
        return True
    if m.too_little(values, known):
        return True  # fewer events than the model's gate: as a cold user
    if m.rates_negatives:
        return False
    top = values.max()
    return bool(top <= 0 if m.weighs_by_value else top < 0)


@dataclass(frozen=True)
class _Plan:
    """What a hybrid request needs from the catalogue, derived once per catalogue
    generation instead of per request: the weighted components that have a
    model, whether all of them are ready, their shared item map (None when the
    catalogues differ: the dense blend does not apply), which components
    resolve the user id again (a user map differing from the previous
    component's), the weights, and the version of the whole blend."""

    hy: Hybrid
    cfg: ServerConfig
    generation: int
    comps: tuple[tuple[float, Slot], ...]
    ready: bool
    items: IdMap | None
    new_users: tuple[bool, ...]
    weights: np.ndarray
    version: str
    # per component, 1 where only its items > 0 are candidates (sparse_scores)
    positive: np.ndarray
    # some component reads a value sent without one its own way (`unrated`)
    own_unrated: bool

    @classmethod
    def build(cls, hy: Hybrid, cfg: ServerConfig, catalog: Catalog, generation: int) -> _Plan:
        comps: list[tuple[float, Slot]] = []
        for name, w in hy.weights.items():
            slot = catalog.get(name)
            if w > 0 and slot is not None and slot.model is not None:
                comps.append((w, slot))
        ready = all(catalog.ready(n) for n, w in hy.weights.items() if w > 0)
        items: IdMap | None = None
        new_users: list[bool] = []
        users: IdMap | None = None
        for _, slot in comps:
            m = slot.model
            assert m is not None and m.items is not None and m.users is not None
            new_users.append(users is None or not _same_items(users, m.users))
            users = m.users
        if comps:
            first = comps[0][1].model.items  # type: ignore[union-attr]
            if len(first) and all(_same_items(first, s.model.items) for _, s in comps[1:]):  # type: ignore[union-attr,arg-type]
                items = first
        return cls(
            hy,
            cfg,
            generation,
            tuple(comps),
            ready,
            items,
            tuple(new_users),
            np.array([w for w, _ in comps], np.float64),
            ",".join(f"{s.name}@{s.version}" for _, s in comps),
            np.array([s.model.sparse_scores for _, s in comps], np.uint8),  # type: ignore[union-attr]
            any(type(s.model).unrated is not Recommender.unrated for _, s in comps),
        )


class Router:
    """Answers Recommend / SimilarItems / PredictRatings from the catalogue."""

    def __init__(self, cfg: ServerConfig, catalog: Catalog, online: OnlineState) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self.online = online
        self._pools: dict[tuple[int, int], ScratchPool[np.ndarray]] = {}  # see _pool
        self._plans: dict[str, _Plan] = {}  # per hybrid, rebuilt when the catalogue changes
        self._chains: dict[str, tuple[ServerConfig, list[str]]] = {}

    # -- names -------------------------------------------------------------------

    def default_model(self) -> str:
        """The configured default, else popularity, else the first model by name."""
        if self.cfg.default_model:
            return self.cfg.default_model
        names = [s.name for s in self.catalog.slots()]
        if "popularity" in names:
            return "popularity"
        return names[0] if names else "popularity"

    def names(self) -> list[str]:
        """Every name a request may use: models, hybrids, experiments."""
        real = [s.name for s in self.catalog.slots()]
        return sorted(set(real) | set(self.cfg.hybrids) | set(self.cfg.experiments))

    def unknown_names(self) -> list[tuple[str, str]]:
        """(setting, name) for every name the configuration uses that is no model,
        hybrid or experiment here (a typo, or a model not published yet):
        requests that reach one go on down their fallback chains."""
        known = set(self.names())
        cfg = self.cfg
        refs = [("default_model", cfg.default_model)] if cfg.default_model else []
        if cfg.fallback != type(cfg).fallback:  # the default list is no one's choice
            refs += [("fallback", n) for n in cfg.fallback]
        for k, chain in cfg.fallbacks.items():
            refs += [(f"fallbacks.{k}", n) for n in (k, *chain)]
        for hy in cfg.hybrids.values():
            refs += [(f"hybrids.{hy.name}", n) for n in hy.weights]
        for exp in cfg.experiments.values():
            refs += [(f"experiments.{exp.name}", n) for n in exp.arms]
        return [(where, n) for where, n in refs if n not in known]

    def ready(self, name: str) -> bool:
        """Whether `name` answers itself now (hybrid: every weighted component)."""
        hy = self.cfg.hybrids.get(name)
        if hy is not None:
            return self._plan(hy).ready
        exp = self.cfg.experiments.get(name)
        if exp is not None:
            return all(self.ready(a) for a, w in exp.arms.items() if w > 0)
        return self.catalog.ready(name)

    def _target(self, requested: str, key: str) -> tuple[str, str, str]:
        """(name asked, model to start the chain from, experiment arm or "")."""
        name = requested or self.default_model()
        check_id("model", name)
        exp = self.cfg.experiments.get(name)
        if exp is not None:
            arm = assign_arm(exp.salt, key, exp.arms)
            return name, arm, arm
        if name in self.cfg.hybrids or self.catalog.get(name) is not None:
            return name, name, ""
        if not requested:
            # The server's default names nothing here (a typo, or a model not
            # published yet; logged at start and reload). The client named no
            # model, so this is no error of theirs: the default's fallback chain
            # answers, as for a hybrid's missing component (served_by says who).
            return name, name, ""
        names = self.names()
        available = (
            f"available: {', '.join(names)}"
            if names
            else f"no model is published under {self.cfg.models} yet; publish one, then "
            "ReloadModels or SIGHUP"
        )
        raise RequestError(
            "NOT_FOUND",
            "model",
            f"unknown model {name!r} ({available})",
            "UNKNOWN_MODEL",
            info={"model": name},
        )

    def _plan(self, hy: Hybrid) -> _Plan:
        """The hybrid's plan for the catalogue as it is now (cached per generation)."""
        gen = self.catalog.generation  # read first: a change while building leaves it stale
        plan = self._plans.get(hy.name)
        if plan is None or plan.generation != gen or plan.hy is not hy or plan.cfg is not self.cfg:
            plan = self._plans[hy.name] = _Plan.build(hy, self.cfg, self.catalog, gen)
        return plan

    def _chain(self, start: str) -> Iterable[tuple[str, Slot | Hybrid]]:
        """The ready models of start's chain, in order."""
        hit = self._chains.get(start)
        if hit is None or hit[0] is not self.cfg:
            if len(self._chains) > 1024:  # names come from requests only after _target's check
                self._chains.clear()
            hit = self._chains[start] = (self.cfg, self.cfg.chain(start))
        for name in hit[1]:
            hy = self.cfg.hybrids.get(name)
            if hy is not None:
                if self.ready(name):
                    yield name, hy
                continue
            slot = self.catalog.get(name)
            if slot is not None and slot.state == SERVING:
                yield name, slot

    # -- Recommend ---------------------------------------------------------------------

    def validate(self, q: RecQuery) -> None:
        """Refuse malformed requests before any work, naming every invalid field
        (the first reason found is the error's reason)."""
        bad: list[tuple[str, str, str]] = []  # (field, description, reason)
        if not 1 <= q.k <= self.cfg.max_k:
            bad.append(("k", f"must be in [1, {self.cfg.max_k}], got {q.k}", "K_OUT_OF_RANGE"))
        if len(q.user_id) * 4 > MAX_ID_BYTES or q.version:
            for fname, value in (("user_id", q.user_id), ("version", q.version)):
                try:
                    check_id(fname, value)
                except RequestError as err:
                    bad.append((fname, err.description, err.reason))
        if not q.user_id and not q.history:
            bad.append(("user_id", "give a user_id or a history", "USER_OR_HISTORY_REQUIRED"))
        if len(q.history) > self.cfg.max_history:
            n, most = len(q.history), self.cfg.max_history
            bad.append(("history", f"{n} events; at most {most} allowed", "HISTORY_TOO_LONG"))
        else:
            for i, (item, value) in enumerate(q.history):
                if not item:
                    bad.append((f"history[{i}].item_id", "empty", "FIELD_EMPTY"))
                elif len(item) * 4 > MAX_ID_BYTES:
                    try:
                        check_id(f"history[{i}].item_id", item)
                    except RequestError as err:
                        bad.append((err.field, err.description, err.reason))
                if value is None:  # sent without a value: the model's `unrated`
                    continue
                if not math.isfinite(value):  # np.isfinite: 1 us per Python float
                    what = f"must be finite, got {value}"
                    bad.append((f"history[{i}].value", what, "VALUE_NOT_FINITE"))
                elif not -MAX_VALUE <= value <= MAX_VALUE:
                    what = f"must be within +-{MAX_VALUE:g}, got {value:g}"
                    bad.append((f"history[{i}].value", what, "VALUE_OUT_OF_RANGE"))
        for fname, ids in (("exclude_item_ids", q.exclude), ("candidate_item_ids", q.candidates)):
            if len(ids) > self.cfg.max_ids:
                what = f"{len(ids)} ids; at most {self.cfg.max_ids} allowed"
                bad.append((fname, what, "TOO_MANY_IDS"))
        if bad:
            raise RequestError("INVALID_ARGUMENT", "", "", bad[0][2], [(f, d) for f, d, _ in bad])

    def recommend(self, q: RecQuery, check: Check = nothing) -> Ranked:
        """Top-k for one request: validated, routed, folded in, explained.

        The answer's `stages` holds the seconds spent resolving the user
        (ids, history), retrieving candidates (the model's top-k) and ranking
        (blending, explanations, uncertainty)."""
        t = time.perf_counter()
        stages = {"resolve": 0.0, "retrieve": 0.0, "rank": 0.0}
        self.validate(q)
        plain = self._plain(q, t, stages, check)
        if plain is not None:
            return plain
        asked, start, arm = self._target(q.model, arm_key(q))
        stages["resolve"] += time.perf_counter() - t
        any_ready = False
        for name, entry in self._chain(start):
            any_ready = True
            check()
            if isinstance(entry, Hybrid):
                out = self._hybrid(entry, q, check, stages)
            else:
                served = self._serve(entry, q, q.k, check, stages)
                out = None if served is None else self._ranked(served, q, check, stages)
            if out is not None:
                out.model, out.arm, out.start, out.stages = asked, arm, start, stages
                out.served_by = "" if name == start else name
                return _pinned(out, q.version)
        slot = next((s for s in self.catalog.slots() if s.state == SERVING), None)
        if slot is None:
            raise self._not_loaded(f"{start!r} and its fallbacks are not loaded yet")
        if any_ready:
            log.debug("%s: no model of the chain serves this user; builtin popularity", start)
        t = time.perf_counter()
        out = self._builtin(slot, q)
        stages["retrieve"] += time.perf_counter() - t
        out.model, out.arm, out.start, out.stages = asked, arm, start, stages
        out.served_by = f"{BUILTIN}:{slot.name}"
        return _pinned(out, q.version)

    def _plain(
        self, q: RecQuery, t: float, stages: dict[str, float], check: Check
    ) -> Ranked | None:
        """The common request, answered without the general path's machinery: a
        known user of a loaded real model, asked by name or as the default, with
        no inline or recorded history, exclusions, candidates or explanations.
        The general path's answer, up to float rounding in the scores (the
        one-user kernel sums a dot product in another order than BLAS;
        tests/test_service.py compares them); None for any other request."""
        target = self.plain_target(q)
        if target is None:
            return None
        slot, user = target
        m = slot.model
        assert m is not None
        t2 = time.perf_counter()
        stages["resolve"] += t2 - t
        check()
        c = self.plain_prior(slot)
        if c:
            # a known user under user_prior: the general path's _with_prior, here
            # without its resolving (no history, exclusions or candidates)
            _, s = self._with_prior(slot, q, q.k, None, _NO_IDX, None, c, user)
            stages["retrieve"] += time.perf_counter() - t2
            if s is None:
                return None  # a sparse row reaching nothing: a cold user, down the chain
            return self.plain_answer(slot, q, user, s.items, s.scores, stages, check)
        items, scores = m.recommend_user(user, q.k, filter_seen=not q.include_seen)
        stages["retrieve"] += time.perf_counter() - t2
        if m.sparse_scores and scores.size and scores[-1] <= 0:
            # Items its evidence did not reach: filled by popularity here, as the
            # general path would (once, not by scoring the user twice more there);
            # a user it reaches nothing for goes down the chain as a cold one.
            t3 = time.perf_counter()
            s = self._by_popularity(_Served(slot, items, scores, user, None), q, _NO_IDX, None)
            stages["retrieve"] += time.perf_counter() - t3
            if s is None:
                return None
            items, scores = s.items, s.scores
        return self.plain_answer(slot, q, user, items, scores, stages, check)

    def plain_target(self, q: RecQuery) -> tuple[Slot, int] | None:
        """(slot, user row) when `q` is the plain request (see _plain), else None.
        Dynamic batching scores several of these in one call (plain_batch)."""
        if q.history or q.exclude or q.candidates or q.explain or not q.user_id:
            return None
        name = q.model or self.default_model()
        if name in self.cfg.experiments or name in self.cfg.hybrids:
            return None
        slot = self.catalog.get(name)
        if slot is None or slot.state != SERVING or (q.version and q.version != slot.version):
            return None
        m = slot.model
        assert m is not None and m.users is not None
        user = m.users.get(q.user_id)
        if user < 0 or m.is_cold(user) or m.gated(user) or self.online.history(q.user_id):
            return None
        return slot, user

    @staticmethod
    def plain_prior(slot: Slot) -> float:
        """The `user_prior` a plain request to the slot's model is blended with
        popularity under (_with_prior): 0 for none, for a model ranking through
        an approximate index (no dense row to blend) and for one without
        training counts (Slot.popularity_known): answered as without it then,
        on every path. A plain request with a prior is not batched."""
        m = slot.model
        assert m is not None
        c = float(m.params.get("user_prior", 0.0))
        return c if c and m.has_dense_rows and slot.popularity_known() else 0.0

    @staticmethod
    def plain_batch(
        slot: Slot, users: list[int], k: int, filter_seen: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """The top-k of several plain requests to one model in one batched call
        (one FAISS search or one BLAS product): rows of (items, scores), padded
        with -1 where fewer than k items are eligible."""
        m = slot.model
        assert m is not None
        return m.recommend(users, k, filter_seen=filter_seen)

    def plain_answer(
        self,
        slot: Slot,
        q: RecQuery,
        user: int,
        items: np.ndarray,
        scores: np.ndarray,
        stages: dict[str, float],
        check: Check = nothing,
    ) -> Ranked:
        """The Ranked answer of a plain request from its model's top-k."""
        n = unpadded(items)
        served = _Served(slot, items[:n], scores[:n], user, None)
        t3 = time.perf_counter()
        out = self._ranked_timed(served, q, check)
        stages["rank"] += time.perf_counter() - t3
        name = slot.name
        out.model, out.arm, out.start, out.stages, out.served_by = name, "", name, stages, ""
        return out

    def _history(self, model: Recommender, q: RecQuery, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Recorded + inline history as the model's item indices and values."""
        assert model.items is not None
        recorded = self.online.history(q.user_id)
        if not recorded and not q.history:
            return _NO_IDX, _NO_VAL
        if recorded:
            ids = [i for i, _ in recorded]
            idx = model.items.index(ids)
            vals = np.array([v for _, v in recorded], np.float32)
            keep = idx >= 0  # recorded events may name items another model knows
            idx_r, val_r = idx[keep], vals[keep]
            if np.isnan(val_r).any():  # recorded without a value: this model's meaning
                val_r = model.unrated(idx_r, val_r)
        else:
            idx_r, val_r = _NO_IDX, _NO_VAL
        if q.history:
            ids = [i for i, _ in q.history]
            idx = model.items.index(ids)
            unknown = int(np.count_nonzero(idx < 0))
            if unknown > self.cfg.unknown_item_tolerance * len(ids):
                first = ids[int(np.flatnonzero(idx < 0)[0])]
                raise invalid(
                    "history",
                    f"{unknown} of {len(ids)} item ids are unknown to model {name!r} "
                    f"(tolerance {self.cfg.unknown_item_tolerance:.0%}), e.g. {first!r}",
                    "UNKNOWN_HISTORY_ITEMS",
                )
            given = [v for _, v in q.history]
            unrated = None in given
            if unrated:  # values sent without one: NaN here, then this model's meaning
                given = [np.nan if v is None else v for v in given]
            vals = np.array(given, np.float32)
            if unknown:
                keep = idx >= 0
                idx, vals = idx[keep], vals[keep]
            if unrated:
                vals = model.unrated(idx, vals)
            if recorded:
                idx, vals = np.concatenate([idx_r, idx]), np.concatenate([val_r, vals])
            return idx, vals
        return idx_r, val_r

    def _serve(
        self,
        slot: Slot,
        q: RecQuery,
        k: int,
        check: Check,
        stages: dict[str, float],
        component: bool = False,
    ) -> _Served | None:
        """One real model's top-k for the request; None when it cannot serve this
        user. A `sparse_scores` model's items its evidence did not reach (score
        0) are never ranked by index: as a hybrid's `component` its answer keeps
        only the reached items (score > 0); otherwise a user reaching none is
        None (answered as a cold one) and unreached items fill the answer by
        popularity (_by_popularity)."""
        m = slot.model
        assert m is not None and m.items is not None and m.users is not None
        t = time.perf_counter()
        extra_idx, extra_val = self._history(m, q, slot.name)
        user = m.users.get(q.user_id) if q.user_id else -1
        excl = m.items.index(list(q.exclude)) if q.exclude else np.zeros(0, np.int64)
        excl = excl[excl >= 0]
        cand = None
        if q.candidates:
            cand = m.items.index(list(q.candidates))
            cand = cand[cand >= 0]
        t2 = time.perf_counter()
        stages["resolve"] += t2 - t
        if cand is not None and cand.size == 0:
            empty = np.zeros(0, np.int32)
            return _Served(slot, empty, np.zeros(0, np.float32), user, None)
        check()
        try:
            # a new user's history under history_prior, a known user under
            # user_prior: blended with popularity (the params first: no look at
            # the user's row for other models)
            prior = 0.0
            if not component:
                new_c = m.params.get("history_prior", 0.0)
                known_c = m.params.get("user_prior", 0.0)
                if (new_c or known_c) and slot.popularity_known():
                    prior = new_c if user < 0 or m.is_cold(user) else known_c
            s = self._retrieve(slot, q, k, user, extra_idx, extra_val, excl, cand, prior)
            if s is None or s.blended:
                return s
            if not (m.sparse_scores and s.scores.size and s.scores[-1] <= 0):
                return s
            if component:
                keep = s.scores > 0
                return _Served(slot, s.items[keep], s.scores[keep], s.user, s.row)
            return self._by_popularity(s, q, excl, cand)
        finally:
            stages["retrieve"] += time.perf_counter() - t2

    def _with_prior(
        self,
        slot: Slot,
        q: RecQuery,
        k: int,
        row: sp.csr_matrix | None,
        excl: np.ndarray,
        cand: np.ndarray | None,
        c: float,
        user: int = -1,
    ) -> tuple[bool, _Served | None]:
        """A user's answer under the model's prior c (`history_prior` for a new
        user's history, `user_prior` for a known user): its dense row (the
        folded-in `row`, or known `user`'s own when `row` is None) blended
        with popularity's, popularity weighted c / (c + n) for the n events
        (blend_popularity). (False, None) where it does not apply (an
        approximate index: no dense row); (True, None) for a `sparse_scores`
        row that reaches nothing eligible (a cold user to this model: the
        chain answers, as without a prior)."""
        m = slot.model
        assert m is not None
        if row is None and cand is None and not excl.size:
            # a known user, nothing excluded: row and blend in one kernel call
            # where the model has it (blend_popularity's answer)
            a = prior_weight(c, m.training_evidence(user))
            n_cand = min(max(3 * k, 100), m.n_items)
            popular = (slot.popular_order32(), slot.popular_row())
            got = m.prior_user(user, k, (1.0 - a, a), popular, n_cand, not q.include_seen)
            if got is not None:
                items, sums, _ = got
                return True, _Served(slot, items, sums.astype(np.float32), user, None, blended=True)
        pool = self._pool(2, m.n_items)
        rows = pool.take()
        try:
            n = m.prior_row(rows[0], user, row, not q.include_seen)
            if n is None:
                return False, None
            if cand is not None:
                keep = rows[0][cand]
                rows[0].fill(np.nan)
                rows[0][cand] = keep
            if excl.size:
                rows[0][excl] = np.nan
            if m.sparse_scores and not (rows[0] > 0).any():
                return True, None
            w = prior_weight(c, n)
            items, scores = blend_popularity(
                rows, slot.popular_row(), w, k, m.sparse_scores, slot.popular_order32()
            )
        finally:
            pool.give(rows)
        return True, _Served(slot, items, scores, user if row is None else -1, row, blended=True)

    def _by_popularity(
        self, s: _Served, q: RecQuery, excl: np.ndarray, cand: np.ndarray | None
    ) -> _Served | None:
        """A `sparse_scores` answer whose tail holds items scored 0 or less
        (sorted: reached items > 0, unreached = 0, then < 0): None when no item
        has a positive score (the user's evidence reaches nothing eligible: a
        cold user to this model); otherwise the unreached items are replaced by
        the most popular eligible unreached ones (training counts, ties by
        index), where the kernel's top-k took the first by index. Same length,
        their scores stay 0; negative ones follow if room is left."""
        if not (s.scores > 0).any():
            return None  # before scoring the row again
        m = s.slot.model
        assert m is not None
        pool = self._pool(0, m.n_items)
        buf = pool.take()
        try:
            fs = not q.include_seen
            ok = m.dense_user(s.user, buf, fs) if s.row is None else m.dense_history(s.row, buf, fs)
            if not ok:
                return s
            if cand is not None:
                keep = buf[cand]
                buf.fill(np.nan)
                buf[cand] = keep
            if excl.size:
                buf[excl] = np.nan
            filled = fill_unreached(s.items, s.scores, buf, s.slot.popular_order())
        finally:
            pool.give(buf)
        assert filled is not None  # an item scores > 0
        return _Served(s.slot, filled[0], filled[1], s.user, s.row)

    def _retrieve(
        self, slot, q, k, user, extra_idx, extra_val, excl, cand, prior: float = 0.0
    ) -> _Served | None:
        """The model's top-k for a resolved user (known row, or history to fold
        in); with a `prior` c (the model's history_prior for a new user, its
        user_prior for a known one; not for a hybrid's component), blended with
        popularity (_with_prior)."""
        m = slot.model
        if user >= 0 and m.is_cold(user):
            user = -1  # nothing learned of this user: as an unknown one with its history
        if user >= 0 and extra_idx.size == 0 and m.gated(user):
            return None  # fewer events than min_events (with newer ones: counted below)
        if user >= 0 and extra_idx.size == 0 and prior:
            done, blended = self._with_prior(slot, q, k, None, excl, cand, prior, user)
            if done:
                return blended
        if user >= 0 and extra_idx.size == 0 and excl.size == 0 and cand is None:
            # The common case (hybrid components too): the one-user serving call.
            items, scores = m.recommend_user(user, k, filter_seen=not q.include_seen)
            return _Served(slot, items, scores, user, None)
        if user >= 0 and extra_idx.size == 0:
            # Exclusions or candidates: the user's dense row (the one
            # recommend_user selects from), NaN at the excluded items and off
            # the candidates, one top-k call; the general call builds them into
            # sparse matrices (a request excluding 100 items, in process:
            # 0.38-0.97 ms before, 0.14-0.31 ms this way).
            pool = self._pool(0, m.n_items)
            buf = pool.take()
            try:
                if m.dense_user(user, buf, not q.include_seen):
                    if cand is not None:
                        keep = buf[cand]
                        buf.fill(np.nan)
                        buf[cand] = keep
                    buf[excl] = np.nan
                    items, scores = topk.topk_row(buf, k)
                    return _Served(slot, items, scores, user, None)
            finally:
                pool.give(buf)
        if user >= 0 and extra_idx.size == 0:
            items, scores = m.recommend(
                [user],
                k,
                exclude=excl,
                filter_seen=not q.include_seen,
                candidates=None if cand is None else cand,
            )
            items, scores, row = items[0], scores[0], None
        else:
            extra_idx, extra_val = _with_training_row(m, user, extra_idx, extra_val)
            if _no_evidence(m, extra_val, user >= 0):
                return None
            row = _history_row(m, user, extra_idx, extra_val)
            user = -1
            if prior:
                done, blended = self._with_prior(slot, q, k, row, excl, cand, prior)
                if done:
                    return blended
            if cand is None:  # the fold-in's dense row and one top-k call, when exact
                pool = self._pool(0, m.n_items)
                buf = pool.take()
                try:
                    if m.dense_history(row, buf, not q.include_seen):
                        if excl.size:
                            buf[excl] = np.nan
                        items, scores = topk.topk_row(buf, k)
                        return _Served(slot, items, scores, -1, row)
                finally:
                    pool.give(buf)
            items, scores = m.recommend_histories(
                row,
                k,
                exclude=[excl] if excl.size else None,
                filter_seen=not q.include_seen,
                candidates=None if cand is None else [cand],
            )
            items, scores = items[0], scores[0]
        n = unpadded(items)
        return _Served(slot, items[:n], scores[:n], user, row)

    def _pool(self, c: int, n: int) -> ScratchPool[np.ndarray]:
        """Float32 scratch of c rows of n entries (c = 0: one row), one per call in
        progress (not per thread: see ScratchPool): a hybrid's component rows
        for the blend kernel, a fold-in's or an excluding call's scores."""
        pool = self._pools.get((c, n))
        if pool is None:
            if len(self._pools) > 64:  # catalogues that changed size on reloads
                self._pools.clear()
            shape = (c, n) if c else (n,)
            pool = ScratchPool(lambda: np.empty(shape, np.float32))
            pool = self._pools.setdefault((c, n), pool)
        return pool

    def _ranked(self, s: _Served, q: RecQuery, check: Check, stages: dict[str, float]) -> Ranked:
        t = time.perf_counter()
        try:
            return self._ranked_timed(s, q, check)
        finally:
            stages["rank"] += time.perf_counter() - t

    def _ranked_timed(self, s: _Served, q: RecQuery, check: Check) -> Ranked:
        m = s.slot.model
        assert m is not None and m.items is not None
        out = Ranked.of(m.items, s.items.astype(np.int32, copy=False), s.scores, s.slot.version)
        out.folded_in = s.folded_in
        if q.explain and s.items.size:
            check()
            out.because = self._because(s, s.items)
        if m.uncertainty and s.items.size:
            std = m.std_user(s.user, s.items) if s.row is None else m.std_history(s.row, s.items)
            if std is not None:
                out.std = np.asarray(std, float).tolist()
        return out

    def _because(self, s: _Served, items: np.ndarray) -> list[list[str]]:
        """Each item's explanation (the history items that gave it most), all
        computed in one model call."""
        m = s.slot.model
        assert m is not None and m.items is not None
        if s.row is None:
            found = m.explain_user_items(s.user, items, EXPLAIN_ITEMS)
        else:
            found = m.explain_items(s.row, items, EXPLAIN_ITEMS)
        if not found:
            return []
        # every item's ids in one lookup, then cut per item
        ids = iter(m.items.ids(np.concatenate([idx for idx, _ in found])))
        return [list(islice(ids, idx.size)) for idx, _ in found]

    def _hybrid(
        self, hy: Hybrid, q: RecQuery, check: Check, stages: dict[str, float]
    ) -> Ranked | None:
        """Blend the components' min-max-normalized scores over their top candidates."""
        dense = self._hybrid_dense(hy, q, check, stages)
        if dense is not None:
            return dense
        n = max(3 * q.k, 100)
        parts: list[tuple[float, _Served]] = []
        comps = self._plan(hy).comps
        priors = hy.history_prior > 0 or hy.user_prior > 0
        new_user = True  # unknown (or cold) to every component
        first_user = -1  # the user's index in the first component, when known there
        weight = 0.0  # of the components that answered (if with nothing: as the dense path)
        for c, (w, slot) in enumerate(comps):
            m = slot.model
            assert m is not None and m.users is not None
            check()
            if priors and new_user:
                u = m.users.get(q.user_id) if q.user_id else -1
                u = -1 if u >= 0 and m.is_cold(u) else u
                new_user = u < 0
                first_user = u if c == 0 else first_user
            k_c = min(n, max(m.n_items, 1))
            served = self._serve(slot, q, k_c, check, stages, component=True)
            if served is not None:
                weight += w
                if served.items.size:
                    parts.append((w, served))
        if not parts:
            return None
        t = time.perf_counter()
        try:
            pop = None
            prior = (new_user and hy.history_prior) or (first_user >= 0 and hy.user_prior)
            if prior and comps[0][1].popularity_known():
                pop = self._prior_part(hy, comps[0][1], q, n, first_user)
                parts = [(w * (1.0 - pop[0]) / weight, s) for w, s in parts]
            return self._blend(parts, q, check, pop)
        finally:
            stages["rank"] += time.perf_counter() - t

    def _prior_part(
        self, hy: Hybrid, slot: Slot, q: RecQuery, n: int, user: int
    ) -> tuple[float, _Served]:
        """Hybrid `hy`'s popularity part under its prior (_prior_of), from its
        first component's model (`slot`; `user`: the user's index there, -1
        for a new user): its weight, and the n items with the most training
        interactions (ties by index) that the request leaves eligible (not
        excluded, among its candidates, not seen unless include_seen), their
        counts as scores."""
        m = slot.model
        assert m is not None and m.items is not None
        h_idx, h_val = self._history(m, q, slot.name)
        w, seen = self._prior_of(hy, m, user, h_idx, h_val)
        ok = np.ones(m.n_items, bool)
        if q.candidates:
            cand = m.items.index(list(q.candidates))
            ok[:] = False
            ok[cand[cand >= 0]] = True
        if q.exclude:
            excl = m.items.index(list(q.exclude))
            ok[excl[excl >= 0]] = False
        if not q.include_seen:
            ok[seen] = False
        order = slot.popular_order()
        items = order[ok[order]][:n].astype(np.int32)
        return w, _Served(slot, items, slot.popular_counts()[items].astype(np.float32), -1, None)

    @staticmethod
    def _prior_of(
        hy: Hybrid, m: Recommender, user: int, h_idx: np.ndarray, h_val: np.ndarray
    ) -> tuple[float, np.ndarray]:
        """Popularity's weight in hybrid `hy`'s answer, and the items the user
        has seen, by the first component's model `m`: for a user it knows
        (`user` >= 0) user_prior c and their training events plus the recorded
        and inline ones (`h_idx`, `h_val`), for a new user history_prior c and
        those alone; c / (c + n), n their evidence as `m` counts it (repeated
        items once, as a fold-in counts them)."""
        c = hy.history_prior
        if user >= 0:
            c = hy.user_prior
            t_idx, t_val = m.training_row(user)
            if not h_idx.size:  # a training row holds each item once
                return prior_weight(c, m.training_evidence(user)), t_idx
            h_idx = np.concatenate([t_idx.astype(np.int64), h_idx])
            h_val = np.concatenate([np.asarray(t_val, np.float32), h_val])
        row = m.history_matrix([h_idx], [h_val])
        return prior_weight(c, m.evidence(np.asarray(row.data))), h_idx

    def _hybrid_dense(
        self, hy: Hybrid, q: RecQuery, check: Check, stages: dict[str, float]
    ) -> Ranked | None:
        """A hybrid request without candidates, over components that share one
        catalogue: every component writes its dense row (a known user's, or
        the folded-in history's, NaN where not eligible) into pooled scratch
        and one kernel pass blends them; explanations come from the components
        that gave candidates, as on the general path. The general path's
        answer, up to float rounding (tests/test_hybrid_dense.py compares
        them); None for any other request."""
        if q.candidates:
            return None
        t = time.perf_counter()
        plan = self._plan(hy)
        first = plan.items
        if first is None:
            return None
        comps = plan.comps
        m0 = comps[0][1].model
        assert m0 is not None
        if plan.own_unrated and (
            any(v is None for _, v in q.history)
            or any(math.isnan(v) for _, v in self.online.history(q.user_id))
        ):
            # A value sent (or recorded) without one means to a rating model what
            # it expects of the item (its own): the components' rows differ
            # (general path).
            return None
        # Shared items: the history and exclusions resolve (and are checked) once.
        extra_idx, extra_val = self._history(m0, q, comps[0][1].name)
        excl = first.index(list(q.exclude)) if q.exclude else None
        if excl is not None:
            excl = excl[excl >= 0]
        if len(comps) == 1 and hy.user_prior and not extra_idx.size and not q.exclude:
            t2 = time.perf_counter()
            out_r = self._one_known_prior(hy, plan, q, check)
            if out_r is not None:
                stages["resolve"] += t2 - t
                stages["retrieve"] += time.perf_counter() - t2
                return out_r
        n = len(first)
        pool = self._pool(len(comps), n)
        rows = pool.take()
        try:
            t2 = time.perf_counter()
            stages["resolve"] += t2 - t
            user = -1
            new_user = True  # unknown (or cold) to every component
            first_user = -1  # the user's index in the first component, when known there
            shared_row = None  # an unknown user's history row: the same for every component
            # A known user's (user, training row, values, row) with their events,
            # built for one component: the next ones of the same user map whose
            # training row is equal take it (~10-15 us each, of ~250).
            known: tuple[int, tuple[np.ndarray, np.ndarray], np.ndarray, sp.csr_matrix] | None
            known = None
            # (weight, slot, the user's index or -1 when folded in, the folded row)
            used: list[tuple[float, Slot, int, sp.csr_matrix | None]] = []
            picked: list[int] = []  # their positions in comps
            filter_seen = not q.include_seen
            for c, ((w, slot), new_users) in enumerate(zip(comps, plan.new_users, strict=True)):
                check()  # between components too: a passed deadline stops the work
                m = slot.model
                assert m is not None and m.users is not None
                if new_users:  # one lookup per user map
                    user = m.users.get(q.user_id) if q.user_id else -1
                    known = None
                u = -1 if user >= 0 and m.is_cold(user) else user  # as _retrieve
                new_user = new_user and u < 0
                first_user = u if c == 0 else first_user
                out = rows[len(used)]
                row = None
                if u >= 0 and extra_idx.size == 0:
                    if m.gated(u):
                        continue  # below min_events: the general path skips it too
                    ok = m.dense_user(u, out, filter_seen)
                else:
                    if u < 0 and shared_row is not None:
                        if _no_evidence(m, extra_val, False):
                            continue  # this component's gate (or kind of evidence): skipped
                        row = shared_row
                    else:
                        own = m.training_row(u) if u >= 0 else None
                        reuse = (
                            known
                            if own is not None
                            and known is not None
                            and known[0] == u
                            and _same_row(known[1], own)
                            else None
                        )
                        if reuse is not None:
                            val, row = reuse[2], reuse[3]
                        else:
                            idx, val = _with_training_row(m, u, extra_idx, extra_val, own)
                        if _no_evidence(m, val, u >= 0):
                            continue  # the general path skips this component too
                        if row is None:
                            row = _history_row(m, u, idx, val)
                            if u < 0:
                                shared_row = row
                            else:
                                assert own is not None
                                known = (u, own, val, row)
                    ok = m.dense_history(row, out, filter_seen)
                if not ok:
                    stages["retrieve"] += time.perf_counter() - t2
                    return None
                if excl is not None and excl.size:
                    out[excl] = np.nan
                used.append((w, slot, -1 if row is not None else u, row))
                picked.append(c)
            t3 = time.perf_counter()
            stages["retrieve"] += t3 - t2
            if not used:
                return None
            n_cand = min(max(3 * q.k, 100), n)
            every = len(used) == len(comps)
            weights = plan.weights if every else plan.weights[picked]
            positive = plan.positive if every else plan.positive[picked]
            n_rows = len(used)
            popular = None
            slot0 = comps[0][1]
            prior = (new_user and hy.history_prior) or (first_user >= 0 and hy.user_prior)
            if prior and slot0.popularity_known():  # popularity's part, as the general path's
                a, seen = self._prior_of(hy, m0, first_user, extra_idx, extra_val)
                banned = seen if filter_seen else _NO_IDX
                if excl is not None and excl.size:
                    banned = np.concatenate([banned, excl])
                popular = (slot0.popular_order32(), slot0.popular_row(), banned.astype(np.int32))
                # (np.r_ cost ~15 us here)
                scaled = np.empty(n_rows + 1)
                np.multiply(weights, (1.0 - a) / float(np.add.reduce(weights)), out=scaled[:n_rows])
                scaled[n_rows] = a
                weights = scaled
            items, scores, counts = blend_dense(
                rows[:n_rows], weights, n_cand, q.k, positive, popular
            )
            out_r = Ranked.of(first, items, scores, "")
            # a list: numpy's all() on 3 ints cost ~1.5 us a call
            per_row = counts[: len(used)].tolist()
            if every and all(per_row):
                parts = used
                out_r.version = plan.version
            else:
                parts = [u for u, c in zip(used, per_row, strict=True) if c]
                if not parts:
                    return None
                out_r.version = ",".join(f"{s.name}@{s.version}" for _, s, _, _ in parts)
            out_r.folded_in = any(r is not None for _, _, _, r in parts)
            if q.explain and out_r.item_ids:
                check()
                none = np.zeros(0, np.int32)
                served = [(w, _Served(s, none, none, u, r)) for w, s, u, r in parts]
                out_r.because = self._hybrid_because(served, out_r.item_ids)
            stages["rank"] += time.perf_counter() - t3
            return out_r
        finally:
            pool.give(rows)

    def _one_known_prior(self, hy: Hybrid, plan: _Plan, q: RecQuery, check: Check) -> Ranked | None:
        """_hybrid_dense's answer for a hybrid of one component and a known user
        under its user_prior, nothing recorded since training or excluded: the
        component's row and popularity's part blended in one kernel call
        (Recommender.prior_user), as the default quickstart hybrid answers
        most calls. None where that does not apply (a cold or gated user, no
        such kernel, no training counts, a row with no eligible item): the
        dense path answers then."""
        ((w, slot),) = plan.comps
        m = slot.model
        assert m is not None and m.users is not None and plan.items is not None
        u = m.users.get(q.user_id) if q.user_id else -1
        if u < 0 or m.is_cold(u) or m.gated(u) or not slot.popularity_known():
            return None
        check()
        a = prior_weight(hy.user_prior, m.training_evidence(u))
        # the dense path's weights: w scaled to 1 - a (the same float operations)
        weights = (w * ((1.0 - a) / w), a)
        n_cand = min(max(3 * q.k, 100), len(plan.items))
        popular = (slot.popular_order32(), slot.popular_row())
        got = m.prior_user(u, q.k, weights, popular, n_cand, not q.include_seen)
        if got is None or not got[2]:
            return None
        out = Ranked.of(plan.items, got[0], got[1], "")
        out.version = plan.version
        if q.explain and out.item_ids:
            check()
            none = np.zeros(0, np.int32)
            out.because = self._hybrid_because(
                [(w, _Served(slot, none, none, u, None))], out.item_ids
            )
        return out

    def _blend(
        self,
        parts: list[tuple[float, _Served]],
        q: RecQuery,
        check: Check,
        pop: tuple[float, _Served] | None = None,
    ) -> Ranked:
        """The components' answers blended (their min-max-normalized scores,
        weighted); `pop`, the popularity part under the hybrid's priors
        (_prior_part), is blended last and neither explains nor versions."""
        every = [*parts, pop] if pop is not None else parts
        first = parts[0][1].slot.model.items  # type: ignore[union-attr]
        if all(_same_items(first, s.slot.model.items) for _, s in every[1:]):  # type: ignore[union-attr]
            rows, scores = blend_rows(((w, s.items, s.scores) for w, s in every), q.k, len(first))
            out = Ranked.of(first, rows, scores, "")
        else:  # components over different catalogues: blend by id
            order = blend(
                ((w, s.slot.model.items.ids(s.items), s.scores) for w, s in every),  # type: ignore[union-attr]
                q.k,
            )
            out = Ranked([i for i, _ in order], [v for _, v in order])
        out.version = ",".join(f"{s.slot.name}@{s.slot.version}" for _, s in parts)
        out.folded_in = any(s.folded_in for _, s in parts)
        if q.explain:
            check()
            out.because = self._hybrid_because(parts, out.item_ids)
        return out

    def _hybrid_because(
        self, parts: list[tuple[float, _Served]], item_ids: list[str]
    ) -> list[list[str]]:
        """Each blended item's explanation: its components' in weight order, merged
        without repeats (one explain_items call per component)."""
        found: list[list[str]] = [[] for _ in item_ids]
        for _, s in sorted(parts, key=lambda p: -p[0]):
            m = s.slot.model
            assert m is not None and m.items is not None
            idx = m.items.index(item_ids)
            known = np.flatnonzero(idx >= 0)
            if not known.size:
                continue
            for j, because in zip(known, self._because(s, idx[known]), strict=True):
                found[j] += [b for b in because if b not in found[j]]
            if all(len(f) >= EXPLAIN_ITEMS for f in found):
                break  # lighter components could only add past the cut
        return [f[:EXPLAIN_ITEMS] for f in found]

    def _builtin(self, slot: Slot, q: RecQuery) -> Ranked:
        """Most-interacted items of a loaded model's training data, with the
        request's filters: exclusions, candidates and, unless include_seen, what
        the user has seen (training events, recorded events, inline history),
        as a model's answer would."""
        m = slot.model
        assert m is not None and m.items is not None and m.users is not None
        order = slot.popular_order()
        banned = np.zeros(m.n_items, bool)
        if q.exclude:
            e = m.items.index(list(q.exclude))
            banned[e[e >= 0]] = True
        user = m.users.get(q.user_id) if q.user_id else -1
        if not q.include_seen:
            if user >= 0:
                assert m.user_items is not None
                banned[m.user_items[user].indices] = True
            # Not _history: its tolerance of unknown ids is the requested model's
            # to apply, and this model may know fewer of them.
            seen = [i for i, _ in self.online.history(q.user_id)] if q.user_id else []
            seen += [i for i, _ in q.history]
            if seen:
                e = m.items.index(seen)
                banned[e[e >= 0]] = True
        if q.candidates:
            allowed = np.zeros(m.n_items, bool)
            c = m.items.index(list(q.candidates))
            allowed[c[c >= 0]] = True
            banned |= ~allowed
        pick = order[~banned[order]][: q.k]
        scores = slot.popular_counts()[pick].astype(float).tolist()
        return Ranked(m.items.ids(pick), scores, version=slot.version)

    # -- SimilarItems ----------------------------------------------------------------

    def similar(
        self, item_id: str, k: int, model: str = "", check: Check = nothing, version: str = ""
    ) -> Ranked:
        """The k items most similar to one item, from the first model of the chain
        that is loaded, knows the item and has an item similarity."""
        if not 1 <= k <= self.cfg.max_k:
            raise invalid("k", f"must be in [1, {self.cfg.max_k}], got {k}", "K_OUT_OF_RANGE")
        if not item_id:
            raise invalid("item_id", "empty")
        check_id("item_id", item_id)
        check_id("version", version)
        asked, start, arm = self._target(model, item_id)
        any_ready = False
        empty: Ranked | None = None  # the first model that knows the item, with no neighbour
        for name, entry in self._chain(start):
            any_ready = True
            check()
            if isinstance(entry, Hybrid):
                out = self._similar_hybrid(entry, item_id, k)
            else:
                out = self._similar_one(entry, item_id, k)
            if out is not None:
                out.model, out.arm = asked, arm
                out.served_by = "" if name == start else name
                if len(out):  # not item_ids: the answer's bytes never need the strings
                    return _pinned(out, version)
                if empty is None:
                    empty = out
        if empty is not None:  # known, but similar to nothing: no fabricated neighbours
            return _pinned(empty, version)
        if not any_ready:
            raise self._not_loaded(f"{start!r} and its fallbacks are not loaded yet")
        raise RequestError(
            "NOT_FOUND",
            "item_id",
            f"unknown item {item_id!r} for model {start!r} and fallbacks",
            "UNKNOWN_ITEM",
        )

    def _similar_one(self, slot: Slot, item_id: str, k: int) -> Ranked | None:
        found = self._similar_rows(slot, item_id, k)
        if found is None:
            return None
        m = slot.model
        assert m is not None and m.items is not None
        return Ranked.of(m.items, found[0], found[1], slot.version)

    def _similar_rows(
        self, slot: Slot, item_id: str, k: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """A model's k most similar items as (rows, scores); None when it does not
        know the item or has no item similarity."""
        m = slot.model
        if m is None or m.items is None:
            return None
        idx = m.items.get(item_id)
        if idx < 0:
            return None
        try:
            items, scores = m.similar_items(idx, min(k, max(m.n_items - 1, 1)))
        except NotImplementedError:
            return None
        if m.sparse_scores and scores.size and scores[-1] <= 0:
            keep = scores > 0  # 0: no shared user or feature, not a weak likeness
            items, scores = items[keep], scores[keep]
        return items, scores

    def _similar_hybrid(self, hy: Hybrid, item_id: str, k: int) -> Ranked | None:
        n = max(3 * k, 100)
        parts: list[tuple[float, Slot, np.ndarray, np.ndarray]] = []
        known: Slot | None = None  # a component that knows the item
        for name, w in hy.weights.items():
            slot = self.catalog.get(name)
            if w <= 0 or slot is None:
                continue
            found = self._similar_rows(slot, item_id, n)
            if found is None:
                continue
            if known is None:
                known = slot
            if found[0].size:
                parts.append((w, slot, found[0], found[1]))
        if not parts:
            if known is None:
                return None
            assert known.model is not None and known.model.items is not None
            none = np.zeros(0, np.int32)
            version = f"{known.name}@{known.version}"
            return Ranked.of(known.model.items, none, none.astype(np.float32), version)
        version = ",".join(f"{s.name}@{s.version}" for _, s, _, _ in parts)
        first = parts[0][1].model.items  # type: ignore[union-attr]
        if all(_same_items(first, s.model.items) for _, s, _, _ in parts[1:]):  # type: ignore[union-attr]
            # blend_rows' answer by the blend kernel: each part as a dense row (NaN
            # off its items), every entry of a row among its candidates
            pool = self._pool(len(parts), len(first))
            dense = pool.take()
            try:
                dense.fill(np.nan)
                for c, (_, _, i, v) in enumerate(parts):
                    dense[c, i] = v
                n_cand = max(i.size for _, _, i, _ in parts)
                rows, scores, _ = blend_dense(dense, [w for w, _, _, _ in parts], n_cand, k)
            finally:
                pool.give(dense)
            return Ranked.of(first, rows, scores, version)
        order = blend(((w, s.model.items.ids(i), v) for w, s, i, v in parts), k)  # type: ignore[union-attr]
        return Ranked([i for i, _ in order], [v for _, v in order], version=version)

    # -- PredictRatings ----------------------------------------------------------------

    def predict(
        self,
        user_id: str,
        history: Sequence[tuple[str, float | None]],
        item_ids: Sequence[str],
        model: str = "",
        interval: float | None = None,
        version: str = "",
    ) -> Prediction:
        """Predicted ratings (mean, std, central interval) from a rating model."""
        level = 0.95 if interval is None else interval
        if not 0 < level < 1:
            raise invalid("interval", f"must be in (0, 1), got {interval}", "INTERVAL_OUT_OF_RANGE")
        if not item_ids:
            raise invalid("item_ids", "give at least one item")
        if len(item_ids) > self.cfg.max_ids:
            most = self.cfg.max_ids
            raise invalid(
                "item_ids", f"{len(item_ids)} ids; at most {most} allowed", "TOO_MANY_IDS"
            )
        for i, item in enumerate(item_ids):  # malformed, not a missing item (NOT_FOUND)
            if not item:
                raise invalid(f"item_ids[{i}]", "empty", "FIELD_EMPTY")
            if len(item) * 4 > MAX_ID_BYTES:
                check_id(f"item_ids[{i}]", item)
        check_id("version", version)
        q = RecQuery(user_id=user_id, history=history, k=1, model=model)
        if user_id or history:
            self.validate(q)
        asked, start, _ = self._target(model, arm_key(q))
        if model and not self._predicts(start):
            raise invalid("model", f"{start!r} does not predict ratings", "NOT_A_RATING_MODEL")
        rating_models = [n for n in self.cfg.chain(start) if self._predicts(n)]
        if not model:  # the default model may rank only: any rating model will do
            rating_models += [s.name for s in self.catalog.slots() if self._predicts(s.name)]
        for name in rating_models:
            slot = self.catalog.get(name)
            if slot is None or slot.state != SERVING:
                continue
            out = self._predict_one(slot, q, list(item_ids), level)
            out.model = asked
            out.served_by = "" if name == start else name
            return _pinned(out, version)
        if not rating_models and self.catalog.slots():
            # Nothing published predicts ratings: not a wait (UNAVAILABLE would
            # send the shipped retry policy round three times), a state to fix.
            what = (
                "no rating model is published (train and publish svd or bayes_mf: "
                "recserve train --algo svd); the models here only rank"
            )
            raise RequestError("FAILED_PRECONDITION", "model", what, "NO_RATING_MODEL")
        raise self._not_loaded(f"no rating model in the chain of {start!r} is loaded yet")

    def _not_loaded(self, what: str) -> RequestError:
        """UNAVAILABLE (MODEL_NOT_LOADED): nothing that could answer is loaded,
        and when no model is published at all, where to publish one."""
        if not self.catalog.slots():
            what = (
                f"no model is published under {self.cfg.models} yet; publish one, then "
                "ReloadModels or SIGHUP"
            )
        return RequestError("UNAVAILABLE", "model", what, "MODEL_NOT_LOADED")

    def _predicts(self, name: str) -> bool:
        slot = self.catalog.get(name)
        if slot is None:
            return False
        if slot.model is not None:
            return slot.model.predicts_ratings
        try:
            algo = bundle.read_manifest(slot.path)["algorithm"]
        except bundle.BundleError:
            return False
        cls = MODELS.get(algo)
        return bool(cls and cls.predicts_ratings)

    def _predict_one(
        self, slot: Slot, q: RecQuery, item_ids: list[str], level: float
    ) -> Prediction:
        m = slot.model
        assert m is not None and m.items is not None and m.users is not None
        idx = m.items.index(item_ids)
        if (idx < 0).any():
            bad = item_ids[int(np.flatnonzero(idx < 0)[0])]
            what = f"unknown item {bad!r} for {slot.name!r}"
            raise RequestError("NOT_FOUND", "item_ids", what, "UNKNOWN_ITEM", info={"item_id": bad})
        extra_idx, extra_val = self._history(m, q, slot.name)
        user = m.users.get(q.user_id) if q.user_id else -1
        if user >= 0 and extra_idx.size == 0:
            mean, std = m.score(user, idx)
        else:
            extra_idx, extra_val = _with_training_row(m, user, extra_idx, extra_val)
            mean, std = m.score_history(_history_row(m, user, extra_idx, extra_val), idx)
        mean = np.asarray(mean, np.float64)
        std = np.zeros_like(mean) if std is None else np.asarray(std, np.float64)
        z = NormalDist().inv_cdf(0.5 + level / 2)
        lo, hi = getattr(m, "scale", (-np.inf, np.inf))
        return Prediction(
            item_ids,
            mean,
            std,
            np.clip(mean - z * std, lo, hi),
            np.clip(mean + z * std, lo, hi),
            level,
            model=slot.name,
            version=slot.version,
        )

    # -- feedback ------------------------------------------------------------------------

    def known_item(self, item_id: str) -> bool:
        """True when some loaded model knows the item (feedback validation)."""
        for slot in self.catalog.slots():
            m = slot.model
            if (
                slot.state == SERVING
                and m is not None
                and m.items is not None
                and (m.items.get(item_id) >= 0)
            ):
                return True
        return False


_A = TypeVar("_A", Ranked, Prediction)


def _pinned(out: _A, version: str) -> _A:
    """The answer, unless the request pinned another version than the one that
    produced it (NOT_FOUND, reason VERSION_NOT_SERVED)."""
    if not version or out.version == version:
        return out
    who = f"{out.model!r}" + (f" (answered by {out.served_by!r})" if out.served_by else "")
    raise RequestError(
        "NOT_FOUND",
        "version",
        f"{who} serves version {out.version!r}, not the pinned {version!r}",
        "VERSION_NOT_SERVED",
        info={"model": out.model, "served_version": out.version},
    )


_SAME: dict[tuple[int, int], tuple[IdMap, IdMap, bool]] = {}


def _same_items(a: IdMap, b: IdMap) -> bool:
    """Whether two models index the same items the same way (checked once per
    pair of loaded id maps; the maps are kept so their ids are never reused)."""
    if a is b:
        return True
    key = (id(a), id(b))
    hit = _SAME.get(key)
    if hit is None or hit[0] is not a or hit[1] is not b:
        if len(_SAME) > 256:
            _SAME.clear()
        hit = (a, b, len(a) == len(b) and bool(np.array_equal(a.array, b.array)))
        _SAME[key] = hit
    return hit[2]
