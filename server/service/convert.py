"""Protobuf messages <-> the plain values of recserve.serving. No logic beyond shape.

Requests that are not valid protobuf become `Undecodable` (answered
INVALID_ARGUMENT by the core); the common unary answer is written straight
from the model's arrays by `recserve.kernels.wire`.
"""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

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


def history(events: Iterable[pb.Interaction]) -> list[tuple[str, float | None]]:
    """A request's inline history as (item id, value), None where the value was
    omitted (proto3 `optional`)."""
    return [(h.item_id, h.value if h.HasField("value") else None) for h in events]


def rec_query(req: pb.RecommendRequest) -> RecQuery:
    """A RecommendRequest as a RecQuery: k 0 is DEFAULT_K, an omitted history
    value is None (each model's `unrated`: 1 but for rating models; an
    explicit 0 stays 0)."""
    return RecQuery(
        user_id=req.user_id,
        history=history(req.history),
        k=req.k or contract.DEFAULT_K,
        model=req.model,
        exclude=list(req.exclude_item_ids),
        candidates=list(req.candidate_item_ids),
        include_seen=req.include_seen,
        explain=req.explain,
        version=req.version,
    )


def ranked_items(r: Ranked, first: bool = False) -> Iterator[pb.RankedItem]:
    """RankedItems best first with 1-based ranks; with `first`, the first one
    also names the model, version, fallback and arm (the streams' contract)."""
    for pos, (item_id, score) in enumerate(zip(r.item_ids, r.scores, strict=True)):
        item = pb.RankedItem(
            item_id=item_id,
            score=score,
            rank=pos + 1,
            because=r.because[pos] if r.because else (),
            score_std=r.std[pos] if r.std else 0.0,
        )
        if first and pos == 0:
            item.model, item.version, item.served_by, item.arm = (
                r.model,
                r.version,
                r.served_by,
                r.arm,
            )
        yield item


def similar_bytes(r: Ranked) -> pb.SimilarItemsResponse | bytes:
    """`similar_response`, already serialized by kernels.wire when the ranking
    is held as arrays (k=100: ~80 us of RankedItem objects -> a few us)."""
    if r.arrays is None or r.because:
        return similar_response(r)
    items, rows, scores = r.arrays
    return wire.encode_ranked(
        items.rows,
        rows,
        scores.astype(np.float32, copy=False),
        b"",
        _similar_tail(r.model, r.version, r.served_by, r.arm),
        _SIMILAR_FIELD["items"],
        np.array(r.std, np.float32) if r.std else None,
    )


def similar_response(r: Ranked) -> pb.SimilarItemsResponse:
    """GetSimilarItems' answer: the ranking in one message."""
    out = pb.SimilarItemsResponse(
        model=r.model, version=r.version, served_by=r.served_by, arm=r.arm
    )
    add = out.items.add
    for pos, (item_id, score) in enumerate(zip(r.item_ids, r.scores, strict=True)):
        add(item_id=item_id, score=score, rank=pos + 1)
    return out


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
        status=status_pb2.Status(code=0),
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


_SIMILAR_FIELD = wire.check_layout(pb.RankedItem.DESCRIPTOR, pb.SimilarItemsResponse.DESCRIPTOR)


@lru_cache(maxsize=1024)
def _similar_tail(model: str, version: str, served_by: str, arm: str) -> bytes:
    # SimilarItemsResponse's fields after `items`, in number order.
    f = _SIMILAR_FIELD
    return (
        wire.string_field(f["model"], model)
        + wire.string_field(f["version"], version)
        + wire.string_field(f["served_by"], served_by)
        + wire.string_field(f["arm"], arm)
    )


@lru_cache(maxsize=1024)
def _tail(model: str, version: str, served_by: str, arm: str) -> bytes:
    # model .. arm, then status = google.rpc.Status(code=0): an empty but present message.
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
    common answer, with or without bayes_mf's std): kernels.wire writes it from
    the model's arrays in one call, a tenth of building the message (k=10:
    15 -> 3 us with std). `serialize` passes bytes on."""
    if r.arrays is None or r.because:
        return response(request_id, r)
    items, rows, scores = r.arrays
    return wire.encode_ranked(
        items.rows,
        rows,
        scores.astype(np.float32, copy=False),
        wire.string_field(_FIELD["request_id"], request_id),
        _tail(r.model, r.version, r.served_by, r.arm),
        _FIELD["items"],
        np.array(r.std, np.float32) if r.std else None,
    )


class Refusal(Protocol):
    """What a refusal says (recserve.service.core.Failure has these)."""

    code: int
    reason: str
    violations: list[tuple[str, str]]
    info: dict[str, str]
    retry_ms: int | None


def status(f: Refusal) -> status_pb2.Status:
    """The google.rpc.Status of a refusal (AIP-193): ErrorInfo with its stable
    reason, BadRequest with every field violation, RetryInfo with its delay."""
    details = []
    info = error_details_pb2.ErrorInfo(reason=f.reason, domain=contract.ERROR_DOMAIN)
    info.metadata.update(f.info)
    details.append(info)
    if f.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=fld, description=text)
                    for fld, text in f.violations
                ]
            )
        )
    if f.retry_ms is not None and f.retry_ms >= 0:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(f.retry_ms)
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    out = status_pb2.Status(code=int(f.code), message=str(f))
    for d in details:
        packed = any_pb2.Any()
        packed.Pack(d)
        out.details.append(packed)
    return out


def status_trailer(f: Refusal) -> tuple[tuple[str, str | bytes], ...]:
    """The trailing metadata of a refused call: the google.rpc.Status, and gRPC's
    retry pushback where the refusal says when to retry (-1: do not retry)."""
    md: list[tuple[str, str | bytes]] = [(contract.STATUS_DETAILS, status(f).SerializeToString())]
    if f.retry_ms is not None:
        md.append((contract.RETRY_PUSHBACK, str(f.retry_ms)))
    return tuple(md)


def batch_error(request: pb.RecommendRequest, f: Refusal) -> pb.RecommendResponse:
    """A RecommendBatch answer for one refused request; the stream carries on."""
    return pb.RecommendResponse(
        request_id=request.request_id, model=request.model, status=status(f)
    )


_PREDICTION_FIELD = wire.check_prediction_layout(
    pb.RatingPrediction.DESCRIPTOR, pb.PredictRatingsResponse.DESCRIPTOR
)


def predictions(p: Prediction) -> bytes:
    """PredictRatingsResponse in request order, naming who predicted, already
    serialized (kernels.wire: a message object per item cost ~2 us, 5 ms of the
    loop for 2,500 items); `predictions_message` builds the same message."""
    values = np.empty((len(p.item_ids), 4), np.float32)
    for c, column in enumerate((p.rating, p.std, p.lower, p.upper)):
        values[:, c] = column
    return wire.encode_predictions(
        p.item_ids,
        values,
        b"",
        _prediction_tail(struct.pack("<d", p.interval), p.model, p.version, p.served_by),
        _PREDICTION_FIELD["predictions"],
    )


def predictions_message(p: Prediction) -> pb.PredictRatingsResponse:
    """PredictRatingsResponse as a message (what `predictions` encodes)."""
    return pb.PredictRatingsResponse(
        predictions=[
            pb.RatingPrediction(item_id=i, rating=r, std=s, lower=lo, upper=hi)
            for i, r, s, lo, hi in zip(p.item_ids, p.rating, p.std, p.lower, p.upper, strict=True)
        ],
        interval=p.interval,
        model=p.model,
        version=p.version,
        served_by=p.served_by,
    )


@lru_cache(maxsize=1024)
def _prediction_tail(interval: bytes, model: str, version: str, served_by: str) -> bytes:
    # The fields after `predictions`, in number order as protobuf writes them.
    # `interval` is the double's bytes (a float key would make 0.0 and -0.0 one
    # entry); omitted at +0.0, the proto3 default.
    f = _PREDICTION_FIELD
    head = b""
    if interval != bytes(8):
        head = wire.varint(f["interval"] << 3 | 1) + interval
    return (
        head
        + wire.string_field(f["model"], model)
        + wire.string_field(f["version"], version)
        + wire.string_field(f["served_by"], served_by)
    )


_TOKEN_PREFIX = b"recserve.v1/after:"


def page_token(last_name: str) -> str:
    """The opaque ListModels token of the page after `last_name`."""
    return base64.urlsafe_b64encode(_TOKEN_PREFIX + last_name.encode()).decode()


def page_after(token: str) -> str | None:
    """The name a page token continues after, or None for a token not ours."""
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return None
    if not raw.startswith(_TOKEN_PREFIX):
        return None
    try:
        return raw[len(_TOKEN_PREFIX) :].decode()
    except UnicodeDecodeError:
        return None


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


def config_refusal(error: str) -> pb.ModelInfo:
    """ReloadModels' entry for a config (file, hybrids.json) that no longer
    loads: algorithm "config", state FAILED, the reason as error."""
    return pb.ModelInfo(name="config", algorithm="config", state=pb.MODEL_STATE_FAILED, error=error)


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
