"""What a request asks and what the serving path answers, in plain values.

`RecQuery` is one Recommend request; `Ranked` and `Prediction` are answers;
`RequestError` is a refusal naming a status (a gRPC status name, kept as a
string so nothing here imports gRPC) and the offending field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from recserve.contract import REASONS
from recserve.data import IdMap

MAX_ID_BYTES = 1024  # longest user / item / model id, in UTF-8 bytes

Check = Callable[[], None]  # raises when the caller went away (cancel, deadline)


def nothing() -> None:
    """The Check of a caller that never goes away."""
    return None


class RequestError(Exception):
    """A request the service refuses: `status` names a gRPC status code, `reason`
    one of recserve.contract.REASONS, `field` the offending field. `violations`
    holds (field, description) for every invalid field when there are several;
    `info` adds ErrorInfo metadata (e.g. the version a model serves)."""

    def __init__(
        self,
        status: str,
        field: str,
        message: str,
        reason: str = "",
        violations: Sequence[tuple[str, str]] = (),
        info: dict[str, str] | None = None,
    ) -> None:
        if violations and not field:
            field, message = violations[0]
        super().__init__(
            "; ".join(f"{f}: {m}" for f, m in violations) if violations else f"{field}: {message}"
        )
        self.status = status
        self.field = field
        self.description = message
        self.reason = reason or _DEFAULT_REASON[status]
        if self.reason not in REASONS:
            raise ValueError(f"unlisted error reason {self.reason!r}")
        self.violations = list(violations) or (
            [(field, message)] if status == "INVALID_ARGUMENT" and field else []
        )
        self.info = info or {}


_DEFAULT_REASON = {
    "INVALID_ARGUMENT": "MALFORMED_REQUEST",
    "NOT_FOUND": "UNKNOWN_MODEL",
    "UNAVAILABLE": "MODEL_NOT_LOADED",
}


def invalid(field: str, message: str, reason: str = "FIELD_EMPTY") -> RequestError:
    """An INVALID_ARGUMENT refusal naming `field` and its reason."""
    return RequestError("INVALID_ARGUMENT", field, message, reason)


def check_id(field: str, value: str) -> None:
    """Refuse an id longer than MAX_ID_BYTES (ids are stored and hashed as bytes)."""
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise invalid(field, f"longer than {MAX_ID_BYTES} bytes", "ID_TOO_LONG")


@dataclass
class RecQuery:
    """A Recommend request in plain values."""

    user_id: str = ""
    # (item id, value); value None: sent without one (Recommender.unrated)
    history: Sequence[tuple[str, float | None]] = ()
    k: int = 10
    model: str = ""
    exclude: Sequence[str] = ()
    candidates: Sequence[str] = ()
    include_seen: bool = False
    explain: bool = False
    version: str = ""  # pin: the answer must come from exactly this version


class Ranked:
    """Ranked item ids with scores (and explanations / std where asked and known).

    Built from lists, or by `of` from a model's arrays (item rows best first,
    their scores): then the id strings and float scores are made only when
    read, and the unary answer encodes the arrays straight to the wire
    (recserve.service.convert.response_bytes)."""

    __slots__ = (
        "_item_ids",
        "_scores",
        "arm",
        "arrays",
        "because",
        "folded_in",
        "model",
        "served_by",
        "stages",
        "start",
        "std",
        "version",
    )

    def __init__(
        self,
        item_ids: list[str],
        scores: list[float],
        because: list[list[str]] | None = None,
        std: list[float] | None = None,
        model: str = "",
        version: str = "",
    ) -> None:
        self._item_ids: list[str] | None = item_ids
        self._scores: list[float] | None = scores
        # (IdMap of the model's items, int32 rows, float32 scores) when built by `of`
        self.arrays: tuple[IdMap, np.ndarray, np.ndarray] | None = None
        self.because = because if because is not None else []
        self.std = std if std is not None else []
        self.model = model  # the name the caller asked for (after defaulting)
        self.version = version
        self.served_by = ""  # set when another model than the asked one answered
        self.arm = ""
        self.start = ""  # the model the chain started from (the arm, for experiments)
        self.folded_in = False  # a model folded the user in from a history
        self.stages: dict[str, float] = {}  # seconds per serving stage

    @classmethod
    def of(cls, items: IdMap, rows: np.ndarray, scores: np.ndarray, version: str) -> Ranked:
        """A ranking held as arrays: `rows` (int32 item rows, best first) and their
        `scores` (any float dtype; the wire encoder takes them as float32)."""
        out = cls(None, None, version=version)  # type: ignore[arg-type]
        out.arrays = (items, rows, scores)
        return out

    @property
    def item_ids(self) -> list[str]:
        if self._item_ids is None:
            assert self.arrays is not None
            self._item_ids = self.arrays[0].ids(self.arrays[1])
        return self._item_ids

    @property
    def scores(self) -> list[float]:
        if self._scores is None:
            assert self.arrays is not None
            self._scores = self.arrays[2].astype(float).tolist()
        return self._scores

    def __len__(self) -> int:
        """How many items, without making the id strings."""
        if self._item_ids is None and self.arrays is not None:
            return int(self.arrays[1].shape[0])
        return len(self.item_ids)

    def __repr__(self) -> str:
        return (
            f"Ranked(item_ids={self.item_ids!r}, scores={self.scores!r}, model={self.model!r}, "
            f"version={self.version!r}, served_by={self.served_by!r}, arm={self.arm!r})"
        )


@dataclass
class Prediction:
    """Predicted ratings in request order (float64 arrays, one entry per id)."""

    item_ids: list[str]
    rating: np.ndarray
    std: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    interval: float
    model: str
    version: str
    served_by: str = ""
