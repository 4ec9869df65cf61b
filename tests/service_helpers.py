"""Shared pieces of the service tests: published models, a running in-process server."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry

from recserve.config import ServerConfig, load_config
from recserve.models import Recommender, create
from recserve.service import App
from recserve.serving import default_loader
from recserve.v1 import recommender_pb2 as pb
from recserve.v1 import recommender_pb2_grpc as pb_grpc

MODELS = {
    "popularity": ("popularity", {}),
    "itemknn": ("itemknn", {"k": 50}),
    "als": ("als", {"factors": 16, "iterations": 5}),
    "bayes_mf": ("bayes_mf", {"factors": 8, "epochs": 5}),
}


def publish_models(small, root: Path) -> dict[str, Recommender]:
    """Train and publish the test models; returns the fitted models by name."""
    out = {}
    for name, (algo, params) in MODELS.items():
        model = create(algo, **params).fit(small)
        model.save(root, name, dataset=small)
        out[name] = model
    return out


def wait_for(pred: Callable[[], object], timeout: float = 30.0, what: str = "") -> object:
    """Poll `pred` until it returns something truthy (returned); AssertionError
    naming `what` after `timeout` seconds. Tests wait with this, never a bare sleep."""
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"not true after {timeout}s: {what or pred}")
        time.sleep(0.01)


class Gate:
    """A loader that holds chosen models back until released (a slow load, on demand)."""

    def __init__(self, *names: str) -> None:
        self.events = {n: threading.Event() for n in names}

    def __call__(self, path: Path, full: bool) -> Recommender:
        ev = self.events.get(path.parent.name)
        if ev is not None:
            ev.wait(60)
        return default_loader(path, full)

    def release(self, name: str) -> None:
        self.events[name].set()


class Server:
    """A running App on a loopback port with stubs for each service."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.target = f"127.0.0.1:{app.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.rec = pb_grpc.RecommenderStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def recommend(self, **kw) -> tuple[list[pb.RankedItem], dict[str, str]]:
        """Items and metadata of one (unary) Recommend call. The metadata comes as
        trailers and must agree with the response's own fields."""
        kw.setdefault("k", 10)
        resp, call = self.rec.Recommend.with_call(pb.RecommendRequest(**kw), timeout=10)
        md = dict(call.trailing_metadata())
        assert md["x-recserve-model"] == resp.model
        assert md["x-recserve-version"] == resp.version
        assert md.get("x-recserve-served-by", "") == resp.served_by
        assert md.get("x-recserve-arm", "") == resp.arm
        assert resp.request_id == kw.get("request_id", "")
        return list(resp.items), md

    def recommend_stream(self, **kw) -> tuple[list[pb.RankedItem], dict[str, str]]:
        """Items and initial metadata of one RecommendStream call."""
        kw.setdefault("k", 10)
        call = self.rec.RecommendStream(pb.RecommendRequest(**kw), timeout=10)
        items = list(call)
        return items, dict(call.initial_metadata())

    def error(self, fn, request, **kw) -> grpc.RpcError:
        """The RpcError a call fails with (AssertionError when it succeeds)."""
        try:
            out = fn(request, timeout=kw.pop("timeout", 10), **kw)
            if hasattr(out, "__iter__") and not hasattr(out, "DESCRIPTOR"):
                list(out)
        except grpc.RpcError as exc:
            return exc
        raise AssertionError("the call succeeded")


# Ports handed out by free_port, held (bound, never listening) until the test
# process ends.
_HELD_PORTS: list[socket.socket] = []


def free_port() -> int:
    """A loopback port for a server a test is about to start, held for the rest
    of the session. A port found free and then released can be handed out again
    before the server binds it, as a new connection's local port or to a server
    binding port 0 (the app's own gRPC server): a fresh-clone CI run failed so,
    EADDRINUSE on the metrics port. Held bound but never listening, with
    SO_REUSEADDR, the port goes to nobody else, while a server that sets
    SO_REUSEADDR too (gRPC, prometheus_client, Prometheus and Redis do) still
    binds and listens on it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    _HELD_PORTS.append(s)
    return s.getsockname()[1]


@contextlib.contextmanager
def running(
    models: Path,
    loader=default_loader,
    wait: bool = True,
    config: Path | None = None,
    **settings,
) -> Iterator[Server]:
    """An App on 127.0.0.1:<free port>, drained at exit. With `config`, the
    settings come from that TOML file, as `recserve serve --config` reads it,
    the others given here as flags."""
    settings.setdefault("metrics_port", 0)
    # In memory unless a test asks: the default (a SQLite file in var/ under the
    # working directory) would be shared by every test server.
    if "feedback_db" not in settings:
        settings.setdefault("feedback", "memory:")
    # RECSERVE_TEST_SERVER=asyncio runs the same tests on the grpc.aio server.
    settings.setdefault("server", os.environ.get("RECSERVE_TEST_SERVER", "threads"))
    if config is not None:
        flags = {"models": str(models), "host": "127.0.0.1", "port": 0, **settings}
        cfg = load_config(config, env={}, overrides=flags)
    else:
        cfg = ServerConfig(models=str(models), host="127.0.0.1", port=0, **settings)
    app = App(cfg, loader=loader, registry=CollectorRegistry())
    app.start()
    if wait:
        app.catalog.wait(60)
    srv = Server(app)
    try:
        yield srv
    finally:
        srv.channel.close()
        app.drain(grace=0)


def assert_explanation(model, user: int, item: int, items, contrib, rtol: float = 1e-4) -> None:
    """model.explain(user, item) is exactly the positive part of a reference
    decomposition (history items, contributions): same items, largest first
    (ties by item index), same values within float32 rounding."""
    import numpy as np

    items, contrib = np.asarray(items), np.asarray(contrib, np.float64)
    keep = contrib > 0
    order = np.lexsort((items[keep], -contrib[keep]))
    got_items, got = model.explain(user, item, n=10_000)
    np.testing.assert_array_equal(got_items, items[keep][order])
    np.testing.assert_allclose(got, contrib[keep][order], rtol=rtol, atol=1e-6)


def flip_byte(path: Path, offset: int = -1) -> None:
    """Change one byte of a file in place (xor 0xFF, so never a no-op): a tamper
    that keeps the size and that a constant write might not make."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def status_details(err: grpc.RpcError) -> status_pb2.Status:
    """The google.rpc.Status a refused call carries in grpc-status-details-bin
    (AssertionError when there is none, or its code is not the call's)."""
    trailer = dict(err.trailing_metadata() or ())
    assert "grpc-status-details-bin" in trailer, f"no status details: {err.details()}"
    st = status_pb2.Status.FromString(trailer["grpc-status-details-bin"])
    assert st.code == err.code().value[0] and st.message == err.details()
    return st


def _detail(st: status_pb2.Status, cls):
    found = [d for d in st.details if d.Is(cls.DESCRIPTOR)]
    assert len(found) == 1, f"{len(found)} {cls.DESCRIPTOR.name} details in {st}"
    out = cls()
    found[0].Unpack(out)
    return out


def error_info(st: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    """The Status's one ErrorInfo (its domain checked)."""
    info = _detail(st, error_details_pb2.ErrorInfo)
    assert info.domain == "recserve.v1"
    return info


def bad_request(st: status_pb2.Status) -> list[tuple[str, str]]:
    """The (field, description) pairs of the Status's one BadRequest."""
    return [
        (v.field, v.description) for v in _detail(st, error_details_pb2.BadRequest).field_violations
    ]


def retry_info(st: status_pb2.Status) -> error_details_pb2.RetryInfo:
    """The Status's one RetryInfo."""
    return _detail(st, error_details_pb2.RetryInfo)
