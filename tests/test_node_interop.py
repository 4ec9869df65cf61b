"""Interop: Node.js (@grpc/grpc-js + @grpc/proto-loader) calls Recommend from the .proto
files alone and gets the same ranking and metadata as a Python client, and reads a
refusal's reason and field violations from its google.rpc.Status with protobufjs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.service_helpers import publish_models, running

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "tests" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the test's npm packages installed (npm ci from the lock file)."""
    exe = shutil.which("node")
    if exe is None:
        pytest.skip("node is not installed: the Node.js interop test needs node and npm")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("node is installed but npm is not: cannot install @grpc/grpc-js")
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            pytest.fail(f"npm ci in {NODE_DIR} failed:\n{done.stderr[-2000:]}")
    return exe


def test_node_client_calls_recommend(node, small, tmp_path):
    publish_models(small, tmp_path)
    with running(tmp_path) as srv:
        want, md = srv.recommend(user_id="7", k=6, model="als")
        cold, cold_md = srv.recommend(user_id="nobody", k=3, model="als")

        def call(user: str, k: int, model: str = "") -> dict:
            out = subprocess.run(
                [node, "recommend.js", srv.target, include_dirs(), user, str(k), model],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        got = call("7", 6, "als")
        fallback = call("nobody", 3, "als")
        bad = call("7", -1)
        default_k = call("7", 0)
    assert [i["item_id"] for i in got["items"]] == [i.item_id for i in want]
    assert [i["rank"] for i in got["items"]] == [1, 2, 3, 4, 5, 6]
    assert got["metadata"]["x-recserve-model"] == "als"
    assert got["metadata"]["x-recserve-version"] == md["x-recserve-version"] == got["version"]
    assert got["model"] == "als"
    assert [i["item_id"] for i in fallback["items"]] == [i.item_id for i in cold]
    assert fallback["metadata"]["x-recserve-served-by"] == cold_md["x-recserve-served-by"]
    assert bad["error"]["code"] == 3 and bad["error"]["details"].startswith("k:")
    status = bad["error"]["status"]  # decoded by Node from grpc-status-details-bin
    assert status["code"] == 3 and status["domain"] == "recserve.v1"
    assert status["reason"] == "K_OUT_OF_RANGE" and status["field_violations"] == ["k"]
    assert len(default_k["items"]) == 10  # k omitted: the documented default


def include_dirs() -> str:
    """proto/, and the folders of the google/rpc, google/api and google/protobuf
    protos it imports (shipped by googleapis-common-protos and grpcio-tools)."""
    import google.rpc.status_pb2
    import grpc_tools

    googleapis = Path(google.rpc.status_pb2.__file__).resolve().parents[2]
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    return os.pathsep.join(str(d) for d in (ROOT / "proto", googleapis, well_known))
