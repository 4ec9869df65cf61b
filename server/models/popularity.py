"""Popularity: the most interacted-with items, optionally time-decayed.

The cheapest model and the end of every fallback chain: it answers any
request, including users with no history at all. Scores are shared by every
user, so ranking walks one precomputed order, skipping excluded items
(O(k + excluded) per user instead of scoring the catalogue).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from recserve.data import Dataset
from recserve.kernels import topk
from recserve.models.base import Param, Recommender, ScratchPool, check_k
from recserve.models.registry import register

DAY = 86_400


@register
class Popularity(Recommender):
    """Items ranked by interaction count (or summed value), with optional half-life decay."""

    algorithm = "popularity"
    serves_cold = True
    params_spec: ClassVar[Mapping[str, Param]] = {
        "half_life_days": Param(
            float, 0.0, "time decay half-life in days; 0 = no decay", min=0, search=(0, 3650)
        ),
        "weighting": Param(
            str,
            "count",
            "count events (dislikes not counted), or sum their values (dislikes subtract)",
            choices=("count", "value"),
            search_choices=("count", "value"),
        ),
    }

    @classmethod
    def fixed_by_data(cls, dataset: Dataset) -> dict[str, Any]:
        """No time decay to search without timestamps."""
        return {} if dataset.has_timestamps else {"half_life_days": 0.0}

    def _fit(self, dataset: Dataset) -> None:
        m = dataset.interactions
        # count: the events that are not dislikes (a thumbs-down is no vote for
        # an item's popularity); value: their sum, where a dislike subtracts
        weights = (
            (m.data >= 0).astype(np.float64)
            if self.params["weighting"] == "count"
            else m.data.astype(np.float64)
        )
        half_life = self.params["half_life_days"]
        if half_life > 0:
            if not dataset.has_timestamps:
                raise ValueError(
                    f"{dataset.name}: half_life_days needs timestamps, and this dataset has none"
                )
            ts = dataset.timestamps.astype(np.float64)
            age_days = (ts.max() - ts) / DAY
            weights = weights * np.exp2(-age_days / half_life)
        scores = np.bincount(m.indices, weights=weights, minlength=m.shape[1])
        self._set_scores(scores.astype(np.float32))

    def _set_scores(self, scores: np.ndarray) -> None:
        self.scores = scores
        # Best first; ties by lower item index (lexsort's last key is primary).
        self.order = np.lexsort((np.arange(scores.size), -scores)).astype(np.int32)

    def _rank(
        self,
        users: np.ndarray | None,
        history: sp.csr_matrix,
        k: int,
        excl: tuple[np.ndarray, np.ndarray],
        cand: tuple[np.ndarray, np.ndarray] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        # Shared scores: walk the precomputed order instead of scoring every item.
        ca = cand if cand is not None else (None, None)
        n = excl[0].shape[0] - 1
        return topk.topk_ranked(
            self.order, self.scores, n, k, excl[0], excl[1], ca[0], ca[1], self.n_threads
        )

    def recommend_user(
        self, user: int, k: int = 10, filter_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """One known user, the serving call: one walk of the shared order
        skipping the user's items, a scratch mask, no validation of the
        exclusion rows (the general path's numpy reductions cost more than
        the walk). Equal to recommend([user], k)[:, :eligible]."""
        self._require_fitted()
        if not 0 <= user < self.n_users:
            raise IndexError(f"users: indices must be in [0, {self.n_users})")
        check_k(k)
        indptr, indices = self._csr_views()
        seen = indices[indptr[user] : indptr[user + 1]] if filter_seen else indices[:0]
        n = max(self.scores.shape[0], 1)
        held = self.__dict__.get("_masks_free")
        if held is None or held[0] != n:
            held = self._masks_free = (n, ScratchPool(lambda: np.zeros(n, np.uint8)))
        mask = held[1].take()
        try:
            return topk.ranked_one(self.order, self.scores, k, seen, mask)
        finally:
            held[1].give(mask)  # left as found: all zero

    def _score_users(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.scores, (users.size, self.scores.size))

    def _score_history(self, history: sp.csr_matrix) -> np.ndarray:
        return np.broadcast_to(self.scores, (history.shape[0], self.scores.size))

    def _similar(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # Popularity knows no item-item relation: the most popular other items.
        n = items.size
        indptr = np.arange(n + 1, dtype=np.int64)
        return topk.topk_ranked(
            self.order,
            self.scores,
            n,
            k,
            indptr,
            items.astype(np.int32),
            None,
            None,
            self.n_threads,
        )

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"scores": self.scores, "order": self.order}

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.scores = arrays["scores"]
        self.order = arrays["order"]
