"""Protobuf messages <-> the plain values of server.retrieval. No logic beyond shape."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

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
            handlers[method.name] = make(
                getattr(impl, method.name),
                request_deserializer=_parser(request),
                response_serializer=response.SerializeToString,
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
