"""The service tests again, on the grpc.aio server (`server = "asyncio"`)."""

from __future__ import annotations

import os

import pytest

from tests.test_service import *  # noqa: F403  (the same tests, collected here again)


@pytest.fixture(scope="module", autouse=True)
def _asyncio_server():
    before = os.environ.get("RECSERVE_TEST_SERVER")
    os.environ["RECSERVE_TEST_SERVER"] = "asyncio"
    yield
    if before is None:
        os.environ.pop("RECSERVE_TEST_SERVER", None)
    else:
        os.environ["RECSERVE_TEST_SERVER"] = before


class PollerCompletionQueue:  # the qualified name of grpc.aio's reader callback's class
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def _handle_events(self) -> None:
        raise self.exc


def test_grpc_events_for_a_closed_loop_are_not_logged_as_errors(published, caplog):
    """grpc.aio reads its one completion queue from every loop that ran gRPC in
    the process; a late event of a server stopped earlier (its loop closed)
    raised "Event loop is closed" in the next server's loop, logged as an
    ERROR with a traceback (a full `make test` run failed so in
    test_a_request_stream_broken_off_is_the_caller_gone_not_an_error). The
    transport's loop drops exactly that noise; other errors still log."""
    import asyncio

    from recserve.service.grpc_aio import quiet_stale_grpc_events

    root, _ = published
    with running(root, server="asyncio") as s:  # noqa: F405
        assert s.app.transport.loop.get_exception_handler() is quiet_stale_grpc_events

    def elsewhere() -> None:
        raise RuntimeError("Event loop is closed")

    loop = asyncio.new_event_loop()
    loop.set_exception_handler(quiet_stale_grpc_events)
    try:
        for exc in (RuntimeError("Event loop is closed"), BlockingIOError(11, "again")):
            loop.call_soon(PollerCompletionQueue(exc)._handle_events)
        loop.call_soon(PollerCompletionQueue(RuntimeError("something else"))._handle_events)
        loop.call_soon(PollerCompletionQueue(ValueError("bad"))._handle_events)
        loop.call_soon(elsewhere)
        loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        loop.close()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 3, errors
