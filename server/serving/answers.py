"""What a request asks and what the serving path answers, in plain values.

`RecQuery` is one Recommend request; `Ranked` and `Prediction` are answers;
`RequestError` is a refusal naming a status (a gRPC status name, kept as a
string so nothing here imports gRPC) and the offending field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from recserve.data import IdMap

MAX_ID_BYTES = 1024  # longest user / item / model id, in UTF-8 bytes

Check = Callable[[], None]  # raises when the caller went away (cancel, deadline)


def nothing() -> None:
    """The Check of a caller that never goes away."""
    return None


class RequestError(Exception):
    """A request the service refuses; `status` names a gRPC status code."""

    def __init__(self, status: str, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field
        self.description = message


def invalid(field: str, message: str) -> RequestError:
    """An INVALID_ARGUMENT refusal naming `field`."""
    return RequestError("INVALID_ARGUMENT", field, message)


def check_id(field: str, value: str) -> None:
    """Refuse an id longer than MAX_ID_BYTES (ids are stored and hashed as bytes)."""
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise invalid(field, f"longer than {MAX_ID_BYTES} bytes")


@dataclass
class RecQuery:
    """A Recommend request in plain values."""

    user_id: str = ""
    history: Sequence[tuple[str, float]] = ()
    k: int = 10
    model: str = ""
    exclude: Sequence[str] = ()
    candidates: Sequence[str] = ()
    include_seen: bool = False
    explain: bool = False


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
    """Predicted ratings in request order."""

    item_ids: list[str]
    rating: list[float]
    std: list[float]
    lower: list[float]
    upper: list[float]
    interval: float
    model: str
    version: str
    served_by: str = ""
