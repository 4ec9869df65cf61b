"""The metrics tests again, on the grpc.aio server (`server = "asyncio"`)."""

from __future__ import annotations

import os

import pytest

from tests.test_metrics import *  # noqa: F403  (the same tests, collected here again)


@pytest.fixture(scope="module", autouse=True)
def _asyncio_server():
    before = os.environ.get("RECSERVE_TEST_SERVER")
    os.environ["RECSERVE_TEST_SERVER"] = "asyncio"
    yield
    if before is None:
        os.environ.pop("RECSERVE_TEST_SERVER", None)
    else:
        os.environ["RECSERVE_TEST_SERVER"] = before
