"""A typed Python client for recserve: plain dataclasses in and out, no protobuf types.

    with RecommenderClient("localhost:50051") as rc:
        rec = rc.recommend("42", k=10)
        for item in rec.items:
            print(item.rank, item.item_id, item.score)
        print(rec.model, rec.version, rec.served_by)

Every call has a deadline (the client's default unless given), and failures
raise `RecserveError` carrying the gRPC status code name, the stable `reason`
(recserve.contract.REASONS), the field violations and the retry delay the
server sent in its google.rpc.Status.

The channel applies the shipped service config (service_config.json beside
this module: round_robin over every address the target resolves to, retries
of UNAVAILABLE on the read-only methods, per-method timeouts) and keepalive
pings, unless `service_config=None` is given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from types import TracebackType
from typing import Any, NamedTuple

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.rpc import error_details_pb2, status_pb2

from recserve import contract
from recserve.clients.health import channel_credentials
from recserve.v1 import recommender_pb2 as pb
from recserve.v1 import recommender_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
KEEPALIVE_MS = 30_000  # a ping on idle connections: dead peers are noticed, NATs stay open


def shipped_service_config() -> dict[str, Any]:
    """The shipped gRPC service config (load balancing, retries, timeouts)."""
    text = resources.files("recserve.clients").joinpath("service_config.json").read_text()
    return json.loads(text)


class RecserveError(Exception):
    """A failed call: `code` is the gRPC status name (e.g. 'INVALID_ARGUMENT'),
    `reason` the stable reason (e.g. 'K_OUT_OF_RANGE'; "" from a server that
    sent none), `field_violations` (field path, description) pairs,
    `retry_delay` the seconds to wait before retrying (None: not said), and
    `metadata` the ErrorInfo metadata."""

    def __init__(
        self,
        code: str,
        message: str,
        reason: str = "",
        field_violations: Sequence[tuple[str, str]] = (),
        retry_delay: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.field_violations = list(field_violations)
        self.retry_delay = retry_delay
        self.metadata = metadata or {}


class Recorded(NamedTuple):
    """What record() stored: new events, refused ones, and repeats of events
    (same user and event_id) stored before."""

    accepted: int
    rejected: int
    duplicates: int


@dataclass(frozen=True)
class Item:
    """One ranked result."""

    item_id: str
    score: float
    rank: int
    because: tuple[str, ...] = ()
    score_std: float = 0.0


@dataclass(frozen=True)
class Recommendation:
    """A ranked list and who produced it."""

    items: list[Item]
    model: str = ""
    version: str = ""
    served_by: str = ""  # non-empty when a fallback answered
    arm: str = ""  # non-empty when an experiment assigned an arm
    request_id: str = ""
    error: RecserveError | None = None  # batch calls: this request failed

    @property
    def item_ids(self) -> list[str]:
        """The ids, best first."""
        return [i.item_id for i in self.items]


@dataclass(frozen=True)
class Event:
    """One interaction: a rating, click or play. `value` None is sent without
    one: 1 (one event), but a rating model (svd, bayes_mf) takes an item
    without one (in a history or recorded) as rated what it expects of the
    item. `timestamp` None is the time the server records it; `event_id`
    (unique per user) makes a retried record() store the event once."""

    item_id: str
    value: float | None = None
    timestamp: int | None = None
    user_id: str = ""
    event_id: str = ""


@dataclass(frozen=True)
class Rating:
    """A predicted rating with its central interval."""

    item_id: str
    rating: float
    std: float
    lower: float
    upper: float


class Ratings(list[Rating]):
    """predict_ratings()'s answer: the Ratings, plus who predicted them."""

    model: str = ""
    version: str = ""
    served_by: str = ""
    interval: float = 0.95


@dataclass(frozen=True)
class ModelDetails:
    """What the server says about one model."""

    name: str
    algorithm: str
    version: str
    state: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    bytes: int = 0
    load_seconds: float = 0.0
    error: str = ""
    n_users: int = 0
    n_items: int = 0


# What a field takes, as a wrong type's TypeError says it: (one, a list of them).
_KINDS = {
    FieldDescriptor.TYPE_STRING: ("a string", "strings"),
    FieldDescriptor.TYPE_INT32: ("an integer", "integers"),
    FieldDescriptor.TYPE_INT64: ("an integer", "integers"),
    FieldDescriptor.TYPE_FLOAT: ("a number", "numbers"),
    FieldDescriptor.TYPE_DOUBLE: ("a number", "numbers"),
    FieldDescriptor.TYPE_BOOL: ("True or False", "booleans"),
}
# The client's own names of request fields (its keyword arguments).
_ARGUMENTS = {"exclude_item_ids": "exclude", "candidate_item_ids": "candidates"}


def _message(cls: Any, where: str = "", **fields: Any) -> Any:
    """cls(**fields), with a wrong type named by its field (`where` prefixes
    it, e.g. "history[2]."): protobuf says only "bad argument type for
    built-in operation" or "'str' object cannot be interpreted as an integer"."""
    try:
        return cls(**fields)
    except (TypeError, ValueError):
        for name, value in fields.items():
            try:
                cls(**{name: value})
            except (TypeError, ValueError):
                f = cls.DESCRIPTOR.fields_by_name[name]
                one, many = _KINDS.get(f.type, ("another type", "other values"))
                want = f"a list of {many}" if f.is_repeated else one
                if f.type == FieldDescriptor.TYPE_STRING:
                    want += " (ids are strings: str(42))"
                got = f"{type(value).__name__} {value!r}"[:80]
                name = _ARGUMENTS.get(name, name)
                raise TypeError(f"{where}{name}: expected {want}, got {got}") from None
        raise


def _interaction(e: Event, user_id: str = "", where: str = "") -> pb.Interaction:
    return _message(
        pb.Interaction,
        where,
        user_id=e.user_id or user_id,
        item_id=e.item_id,
        value=e.value,
        timestamp=e.timestamp,
        event_id=e.event_id,
    )


def _events(name: str, events: Iterable[Event | str] | None, user_id: str = "") -> list:
    """Interactions of item ids (str) and Events; anything else a TypeError
    naming its place (an int id failed as "'int' object has no attribute")."""
    out = []
    for i, e in enumerate(_many(name, events) or ()):
        if isinstance(e, str):
            e = Event(e)
        elif not isinstance(e, Event):
            got = f"{type(e).__name__} {e!r}"[:80]
            raise TypeError(
                f"{name}[{i}]: expected an item id (a string: str(42)) or an Event, got {got}"
            )
        out.append(_interaction(e, user_id, f"{name}[{i}]."))
    return out


def _many(name: str, values: Any) -> Any:
    """`values` unless it is one string: iterating "i42" would send the ids "i",
    "4" and "2" (real ids in catalogues numbered 1..n), so that is refused."""
    if isinstance(values, (str, bytes)):
        what = "item ids or Events" if name in ("history", "events") else "item ids"
        raise TypeError(f"{name}: expected a list of {what}, got the one string {values!r}")
    return values


def _seconds(name: str, value: float) -> float:
    """A deadline in seconds. 0, a negative, NaN or infinite one would send a call
    that has already expired (gRPC answers DEADLINE_EXCEEDED without asking the
    server, even for infinity), so it is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected seconds as a number, got {value!r}")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name}: must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def _history(events: Iterable[Event | str] | None) -> list[pb.Interaction]:
    return _events("history", events)


def _request(
    user_id: str,
    k: int,
    history: Iterable[Event | str] | None,
    model: str,
    exclude: Sequence[str],
    candidates: Sequence[str],
    include_seen: bool,
    explain: bool,
    request_id: str = "",
    version: str = "",
) -> pb.RecommendRequest:
    return _message(
        pb.RecommendRequest,
        user_id=user_id,
        history=_history(history),
        k=k,
        model=model,
        exclude_item_ids=list(_many("exclude", exclude)),
        candidate_item_ids=list(_many("candidates", candidates)),
        include_seen=include_seen,
        explain=explain,
        request_id=request_id,
        version=version,
    )


def _item(m: pb.RankedItem) -> Item:
    return Item(m.item_id, m.score, m.rank, tuple(m.because), m.score_std)


def _items(msgs: Iterable[pb.RankedItem]) -> list[Item]:
    return [_item(m) for m in msgs]


def _first(items: list[Item], first: pb.RankedItem | None, md: dict[str, str]) -> Recommendation:
    """A streamed ranking: who answered from its first item (or the metadata)."""
    if first is not None and first.model:
        return Recommendation(items, first.model, first.version, first.served_by, first.arm)
    return Recommendation(
        items,
        md.get(contract.MODEL, ""),
        md.get(contract.VERSION, ""),
        md.get(contract.SERVED_BY, ""),
        md.get(contract.ARM, ""),
    )


def status_error(code: str, st: status_pb2.Status) -> RecserveError:
    """A RecserveError from a google.rpc.Status (a refused call's, or a batch answer's)."""
    reason, metadata, violations, delay = "", {}, [], None
    for detail in st.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.ToTimedelta().total_seconds()
    return RecserveError(code, st.message, reason, violations, delay, metadata)


def _error(exc: grpc.RpcError) -> RecserveError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    trailer = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailer or ():
        if key == contract.STATUS_DETAILS:
            st = status_pb2.Status()
            try:
                st.ParseFromString(value)
            except Exception:  # a malformed trailer: fall back to code and text
                break
            return status_error(code.name, st)
    return RecserveError(code.name, details or "")


class RecommenderClient:
    """A connection to a recserve server (use as a context manager, or call close())."""

    def __init__(
        self,
        target: str,
        deadline: float = 5.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel: grpc.Channel | None = None,
        token: str = "",
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        service_config: dict[str, Any] | str | None = "shipped",
    ) -> None:
        """`token`: bearer token sent with every call; `tls_ca`: PEM CA file of the
        server's certificate (TLS; "" with tls_cert: the system's roots); `tls_cert`
        + `tls_key`: this client's certificate (mutual TLS). A TLS file that does not
        load is a ValueError naming it. `service_config`: "shipped" (service_config.json), a config
        of your own (dict), or None for gRPC's defaults (pick_first, no retries)."""
        self.deadline = _seconds("deadline", deadline)
        self._md = ((contract.AUTHORIZATION, f"Bearer {token}"),) if token else None
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        if service_config is not None:
            config = shipped_service_config() if service_config == "shipped" else service_config
            if isinstance(config, str):
                config = json.loads(config)
            options += [("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 1)]
        if channel is None and (tls_ca or tls_cert or tls_key):
            # (a client certificate without tls_ca connected in plaintext)
            creds = channel_credentials(tls_ca, tls_cert, tls_key)
            channel = grpc.secure_channel(target, creds, options=options)
        self._channel = channel or grpc.insecure_channel(target, options=options)
        self._rec = pb_grpc.RecommenderStub(self._channel)
        self._admin = pb_grpc.AdminStub(self._channel)

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _timeout(self, deadline: float | None) -> float:
        return self.deadline if deadline is None else _seconds("deadline", deadline)

    def recommend(
        self,
        user_id: str = "",
        k: int = 10,
        *,
        history: Iterable[Event | str] | None = None,
        model: str = "",
        exclude: Sequence[str] = (),
        candidates: Sequence[str] = (),
        include_seen: bool = False,
        explain: bool = False,
        version: str = "",
        deadline: float | None = None,
    ) -> Recommendation:
        """Top-k items for a user id (known, or new with an inline history);
        `version` pins the bundle version (NOT_FOUND when not served)."""
        req = _request(
            user_id, k, history, model, exclude, candidates, include_seen, explain, "", version
        )
        try:
            resp = self._rec.Recommend(req, timeout=self._timeout(deadline), metadata=self._md)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return Recommendation(
            _items(resp.items), resp.model, resp.version, resp.served_by, resp.arm
        )

    def recommend_stream(
        self,
        user_id: str = "",
        k: int = 10,
        *,
        history: Iterable[Event | str] | None = None,
        model: str = "",
        exclude: Sequence[str] = (),
        candidates: Sequence[str] = (),
        include_seen: bool = False,
        explain: bool = False,
        version: str = "",
        deadline: float | None = None,
    ) -> Iterator[Item]:
        """recommend() as a stream of Items, best first, for long lists a caller
        consumes as they arrive (each message costs the server ~0.15 ms)."""
        req = _request(
            user_id, k, history, model, exclude, candidates, include_seen, explain, "", version
        )
        try:
            for m in self._rec.RecommendStream(
                req, timeout=self._timeout(deadline), metadata=self._md
            ):
                yield _item(m)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def recommend_batch(
        self, requests: Iterable[dict[str, Any]], deadline: float | None = None
    ) -> Iterator[Recommendation]:
        """Many recommend() calls over one stream; each dict takes recommend()'s keywords
        plus `request_id`. Yields results in request order; failures carry `error`."""

        failed: list[Exception] = []  # raised in gRPC's thread reading the requests

        def messages() -> Iterator[pb.RecommendRequest]:
            try:
                for r in requests:
                    yield _request(
                        r.get("user_id", ""),
                        r.get("k", 10),
                        r.get("history"),
                        r.get("model", ""),
                        r.get("exclude", ()),
                        r.get("candidates", ()),
                        r.get("include_seen", False),
                        r.get("explain", False),
                        str(r.get("request_id", "")),
                        r.get("version", ""),
                    )
            except Exception as exc:  # gRPC would report it only as a cancelled call
                failed.append(exc)
                raise

        try:
            for resp in self._rec.RecommendBatch(
                messages(), timeout=self._timeout(deadline), metadata=self._md
            ):
                err = None
                if resp.status.code:
                    err = status_error(_code_name(resp.status.code), resp.status)
                yield Recommendation(
                    _items(resp.items),
                    resp.model,
                    resp.version,
                    resp.served_by,
                    resp.arm,
                    resp.request_id,
                    err,
                )
        except grpc.RpcError as exc:
            if failed:  # the caller's own error, not the call's
                raise failed[0] from None
            raise _error(exc) from None

    def similar_items(
        self,
        item_id: str,
        k: int = 10,
        model: str = "",
        deadline: float | None = None,
        *,
        version: str = "",
        stream: bool = False,
    ) -> Recommendation:
        """The k items most similar to one item, in one message (GetSimilarItems),
        or with `stream` one message per item (SimilarItems, for long lists)."""
        req = _message(pb.SimilarItemsRequest, item_id=item_id, k=k, model=model, version=version)
        try:
            if not stream:
                resp = self._rec.GetSimilarItems(
                    req, timeout=self._timeout(deadline), metadata=self._md
                )
                return Recommendation(
                    _items(resp.items), resp.model, resp.version, resp.served_by, resp.arm
                )
            call = self._rec.SimilarItems(req, timeout=self._timeout(deadline), metadata=self._md)
            msgs = list(call)
            md = dict(call.initial_metadata())
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _first(_items(msgs), msgs[0] if msgs else None, md)

    def predict_ratings(
        self,
        item_ids: Sequence[str],
        user_id: str = "",
        *,
        history: Iterable[Event | str] | None = None,
        model: str = "",
        interval: float | None = None,
        version: str = "",
        deadline: float | None = None,
    ) -> Ratings:
        """Predicted ratings (mean, std, central interval; `interval` None is
        0.95) in item order, with the model and version that predicted them."""
        req = _message(
            pb.PredictRatingsRequest,
            user_id=user_id,
            history=_history(history),
            item_ids=list(_many("item_ids", item_ids)),
            model=model,
            interval=interval,
            version=version,
        )
        try:
            resp = self._rec.PredictRatings(req, timeout=self._timeout(deadline), metadata=self._md)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        out = Ratings(
            Rating(p.item_id, p.rating, p.std, p.lower, p.upper) for p in resp.predictions
        )
        out.model, out.version, out.served_by = resp.model, resp.version, resp.served_by
        out.interval = resp.interval
        return out

    def record(
        self, user_id: str, events: Iterable[Event | str], deadline: float | None = None
    ) -> Recorded:
        """Store feedback for a user; returns (accepted, rejected, duplicates) once
        durably stored. Give each Event an event_id to make a retry safe."""
        if not isinstance(user_id, str):
            got = f"{type(user_id).__name__} {user_id!r}"[:80]
            raise TypeError(f"user_id: expected a string (ids are strings: str(42)), got {got}")
        msgs = _events("events", events, user_id)
        try:
            s = self._rec.RecordInteractions(
                iter(msgs), timeout=self._timeout(deadline), metadata=self._md
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return Recorded(int(s.accepted), int(s.rejected), int(s.duplicates))

    def models(self, deadline: float | None = None, page_size: int = 0) -> list[ModelDetails]:
        """Every model the server knows, with its state (all pages)."""
        out: list[ModelDetails] = []
        token = ""
        while True:
            try:
                resp = self._admin.ListModels(
                    pb.ListModelsRequest(page_size=page_size, page_token=token),
                    timeout=self._timeout(deadline),
                    metadata=self._md,
                )
            except grpc.RpcError as exc:
                raise _error(exc) from None
            out += [_details(m) for m in resp.models]
            token = resp.next_page_token
            if not token:
                return out

    def model(self, name: str, deadline: float | None = None) -> ModelDetails:
        """One model's details."""
        try:
            m = self._admin.GetModel(
                pb.GetModelRequest(name=name), timeout=self._timeout(deadline), metadata=self._md
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _details(m)

    def reload(
        self, deadline: float | None = None
    ) -> tuple[list[ModelDetails], list[ModelDetails]]:
        """Ask the server to switch to newly published versions and its config as
        it is now: (reloaded, refused); a config that no longer loads is among
        the refused as algorithm "config", its reason in `error`."""
        try:
            r = self._admin.ReloadModels(
                pb.ReloadModelsRequest(), timeout=self._timeout(deadline), metadata=self._md
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return [_details(m) for m in r.reloaded], [_details(m) for m in r.refused]


def _code_name(value: int) -> str:
    for c in grpc.StatusCode:
        if c.value[0] == value:
            return c.name
    return "UNKNOWN"


def _details(m: pb.ModelInfo) -> ModelDetails:
    return ModelDetails(
        name=m.name,
        algorithm=m.algorithm,
        version=m.version,
        state=pb.ModelState.Name(m.state).removeprefix("MODEL_STATE_").lower(),
        params=dict(m.params),
        metrics=dict(m.metrics),
        bytes=m.bytes,
        load_seconds=m.load_seconds,
        error=m.error,
        n_users=m.n_users,
        n_items=m.n_items,
    )
