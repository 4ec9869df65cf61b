"""Protobuf messages <-> the plain values of recserve.serving. No logic beyond shape.

Requests that are not valid protobuf become `Undecodable` (answered
INVALID_ARGUMENT by the core); the common unary answer is written straight
from the model's arrays by `recserve.kernels.wire`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from recserve import contract
from recserve.kernels import wire
from recserve.serving import Prediction, Ranked, RecQuery, Slot
from recserve.v1 import recommender_pb2 as pb


class Undecodable:
    """Stands for a request whose bytes are not the expected message: the servicer
    answers INVALID_ARGUMENT instead of gRPC's INTERNAL "Exception deserializing"."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    @property
    def message(self) -> str:
        return f"request: not a valid {self.kind} message"


# This process's id, sent with every answer so a caller (and the tests) can tell
# the workers of `serve --workers N` apart; refreshed in a forked worker.
WORKER = str(os.getpid())


def _forked() -> None:
    global WORKER
    WORKER = str(os.getpid())


os.register_at_fork(after_in_child=_forked)


def parser(cls: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: bad bytes become `Undecodable`."""

    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError):
            return Undecodable(cls.DESCRIPTOR.full_name)

    return parse


def serialize(message: Any) -> bytes:
    """A response serializer that passes answers already encoded (response_bytes) on."""
    return message if type(message) is bytes else message.SerializeToString()


STATE = {"loading": pb.MODEL_STATE_LOADING, "serving": pb.MODEL_STATE_SERVING}
STATE_FAILED = pb.MODEL_STATE_FAILED


def rec_query(req: pb.RecommendRequest) -> RecQuery:
    """A RecommendRequest as a RecQuery (history values stay raw; 0 means 1 later)."""
    return RecQuery(
        user_id=req.user_id,
        history=[(h.item_id, float(h.value)) for h in req.history],
        k=int(req.k),
        model=req.model,
        exclude=list(req.exclude_item_ids),
        candidates=list(req.candidate_item_ids),
        include_seen=req.include_seen,
        explain=req.explain,
    )


def ranked_items(r: Ranked) -> Iterator[pb.RankedItem]:
    """RankedItems best first with 1-based ranks."""
    for pos, (item_id, score) in enumerate(zip(r.item_ids, r.scores, strict=True)):
        yield pb.RankedItem(
            item_id=item_id,
            score=score,
            rank=pos + 1,
            because=r.because[pos] if r.because else (),
            score_std=r.std[pos] if r.std else 0.0,
        )


def metadata(
    model: str, version: str, served_by: str = "", arm: str = ""
) -> tuple[tuple[str, str], ...]:
    """Response metadata naming the model, version, fallback, arm and worker."""
    md = [(contract.MODEL, model), (contract.VERSION, version), (contract.WORKER, WORKER)]
    if served_by:
        md.append((contract.SERVED_BY, served_by))
    if arm:
        md.append((contract.ARM, arm))
    return tuple(md)


def response(request_id: str, r: Ranked) -> pb.RecommendResponse:
    """Recommend's answer, and one RecommendBatch answer (items added in place:
    a third of the cost of building RankedItem objects first)."""
    out = pb.RecommendResponse(
        request_id=request_id,
        model=r.model,
        version=r.version,
        served_by=r.served_by,
        arm=r.arm,
        status=pb.Status(code=0),
    )
    add = out.items.add
    if r.because or r.std:
        for pos, (item_id, score) in enumerate(zip(r.item_ids, r.scores, strict=True)):
            add(
                item_id=item_id,
                score=score,
                rank=pos + 1,
                because=r.because[pos] if r.because else (),
                score_std=r.std[pos] if r.std else 0.0,
            )
    else:
        for pos, (item_id, score) in enumerate(zip(r.item_ids, r.scores, strict=True)):
            add(item_id=item_id, score=score, rank=pos + 1)
    return out


_FIELD = wire.check_layout(pb.RankedItem.DESCRIPTOR, pb.RecommendResponse.DESCRIPTOR)


@lru_cache(maxsize=1024)
def _tail(model: str, version: str, served_by: str, arm: str) -> bytes:
    # model .. arm, then status = Status(code=0): an empty but present message.
    status = wire.varint(_FIELD["status"] << 3 | 2) + b"\x00"
    return (
        wire.string_field(_FIELD["model"], model)
        + wire.string_field(_FIELD["version"], version)
        + wire.string_field(_FIELD["served_by"], served_by)
        + wire.string_field(_FIELD["arm"], arm)
        + status
    )


def response_bytes(request_id: str, r: Ranked) -> pb.RecommendResponse | bytes:
    """`response`, already serialized when the ranking is held as arrays (the
    common answer): kernels.wire writes it from the model's arrays in one call,
    a tenth of building the message. `serialize` passes bytes on."""
    if r.arrays is None or r.because or r.std:
        return response(request_id, r)
    items, rows, scores = r.arrays
    return wire.encode_ranked(
        items.rows,
        rows,
        scores.astype(np.float32, copy=False),
        wire.string_field(_FIELD["request_id"], request_id),
        _tail(r.model, r.version, r.served_by, r.arm),
        _FIELD["items"],
    )


def batch_error(request: pb.RecommendRequest, code: int, message: str) -> pb.RecommendResponse:
    """A RecommendBatch answer for one refused request; the stream carries on."""
    return pb.RecommendResponse(
        request_id=request.request_id,
        model=request.model,
        status=pb.Status(code=code, message=message),
    )


def predictions(p: Prediction) -> pb.PredictRatingsResponse:
    """PredictRatingsResponse in request order."""
    return pb.PredictRatingsResponse(
        predictions=[
            pb.RatingPrediction(item_id=i, rating=r, std=s, lower=lo, upper=hi)
            for i, r, s, lo, hi in zip(p.item_ids, p.rating, p.std, p.lower, p.upper, strict=True)
        ],
        interval=p.interval,
    )


def model_info(slot: Slot) -> pb.ModelInfo:
    """ModelInfo of a real model."""
    m = slot.model
    doc = m.manifest if m is not None else {}
    return pb.ModelInfo(
        name=slot.name,
        algorithm=str(doc.get("algorithm", "")),
        version=slot.version,
        params={k: str(v) for k, v in doc.get("params", {}).items()},
        metrics={k: float(v) for k, v in doc.get("metrics", {}).items() if _number(v)},
        bytes=slot.bytes,
        load_seconds=slot.load_seconds,
        state=STATE.get(slot.state, STATE_FAILED),
        error=slot.error,
        n_users=0 if m is None else m.n_users,
        n_items=0 if m is None else m.n_items,
    )


def virtual_info(name: str, kind: str, weights: dict[str, float], ready: bool) -> pb.ModelInfo:
    """ModelInfo of a hybrid or an experiment (params = component weights / fractions)."""
    return pb.ModelInfo(
        name=name,
        algorithm=kind,
        params={k: repr(v) for k, v in weights.items()},
        state=pb.MODEL_STATE_SERVING if ready else pb.MODEL_STATE_LOADING,
    )


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
