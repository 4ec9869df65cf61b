"""Protobuf messages <-> the plain values of server.retrieval. No logic beyond shape."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from kernels import wire
from recserve.v1 import recommender_pb2 as pb
from server.retrieval import Prediction, Ranked, RecQuery, Slot


class Undecodable:
    """Stands for a request whose bytes are not the expected message: the servicer
    answers INVALID_ARGUMENT instead of gRPC's INTERNAL "Exception deserializing"."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    @property
    def message(self) -> str:
        return f"request: not a valid {self.kind} message"


def _parser(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError):
            return Undecodable(cls.DESCRIPTOR.full_name)

    return parse


def add_services(server: Any, recommender: Any, admin: Any) -> None:
    """Register both services on a sync or asyncio server, as the generated
    add_*_to_server functions do, but with request parsers that never raise."""
    for service, impl in (("Recommender", recommender), ("Admin", admin)):
        desc = pb.DESCRIPTOR.services_by_name[service]
        handlers = {}
        for method in desc.methods:
            kind = (
                ("stream" if method.client_streaming else "unary")
                + "_"
                + ("stream" if method.server_streaming else "unary")
            )
            make = getattr(grpc, f"{kind}_rpc_method_handler")
            request = getattr(pb, method.input_type.name)
            response = getattr(pb, method.output_type.name)
            serialize = response.SerializeToString
            if response is pb.RecommendResponse:
                serialize = _serialize  # answers may come encoded (response_bytes)
            handlers[method.name] = make(
                getattr(impl, method.name),
                request_deserializer=_parser(request),
                response_serializer=serialize,
            )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(desc.full_name, handlers),)
        )
        server.add_registered_method_handlers(desc.full_name, handlers)


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


def metadata(r: Ranked) -> tuple[tuple[str, str], ...]:
    """Initial metadata naming the model, version, fallback and arm."""
    md = [("x-recserve-model", r.model), ("x-recserve-version", r.version)]
    if r.served_by:
        md.append(("x-recserve-served-by", r.served_by))
    if r.arm:
        md.append(("x-recserve-arm", r.arm))
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


def _serialize(message: pb.RecommendResponse | bytes) -> bytes:
    return message if type(message) is bytes else message.SerializeToString()


def _check_wire_layout() -> dict[str, int]:
    """RecommendResponse's field numbers, after checking that RankedItem still has
    the numbers and types kernels.wire writes (a changed .proto fails here)."""
    wire_type = {FieldDescriptor.TYPE_STRING: 2, FieldDescriptor.TYPE_FLOAT: 5}
    fields = pb.RankedItem.DESCRIPTOR.fields_by_name
    for name, (number, kind) in wire.RANKED_ITEM_FIELDS.items():
        f = fields.get(name)
        if f is None or f.number != number or wire_type.get(f.type, 0) != kind:
            raise RuntimeError(f"kernels.wire: RankedItem.{name} no longer matches the .proto")
    numbers = {f.name: f.number for f in pb.RecommendResponse.DESCRIPTOR.fields}
    if pb.RecommendResponse.DESCRIPTOR.fields_by_name["items"].message_type is not (
        pb.RankedItem.DESCRIPTOR
    ):
        raise RuntimeError("kernels.wire: RecommendResponse.items is no longer RankedItem")
    return numbers


_FIELD = _check_wire_layout()


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _string(name: str, value: str) -> bytes:
    """A string field of RecommendResponse; empty (the proto3 default) is omitted."""
    if not value:
        return b""
    data = value.encode("utf-8")
    return _varint(_FIELD[name] << 3 | 2) + _varint(len(data)) + data


@lru_cache(maxsize=1024)
def _tail(model: str, version: str, served_by: str, arm: str) -> bytes:
    # model .. arm, then status = Status(code=0): an empty but present message.
    status = _varint(_FIELD["status"] << 3 | 2) + b"\x00"
    return (
        _string("model", model)
        + _string("version", version)
        + _string("served_by", served_by)
        + _string("arm", arm)
        + status
    )


def response_bytes(request_id: str, r: Ranked) -> pb.RecommendResponse | bytes:
    """`response`, already serialized when the ranking is held as arrays (the
    common answer): kernels.wire writes it from the model's arrays in one call,
    a tenth of building the message. Both servers' serializer passes bytes on."""
    if r.arrays is None or r.because or r.std:
        return response(request_id, r)
    items, rows, scores = r.arrays
    return wire.encode_ranked(
        items.rows,
        rows,
        scores.astype(np.float32, copy=False),
        _string("request_id", request_id),
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
