"""A lint of proto/recserve/v1 in the spirit of `buf lint` and `buf breaking`, run
on the descriptor protoc builds (with source info), so no tool is downloaded:

- style: a versioned package, PascalCase messages, services and RPCs,
  lower_snake_case fields, enums whose zero value is <ENUM>_UNSPECIFIED and whose
  values carry the enum's prefix, a comment on every element;
- wire compatibility with release 0.1.0 (tests/data/contract-0.1.0.json): no
  message, field, enum value or RPC removed, renumbered, retyped or re-shaped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import google.rpc.status_pb2
import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "tests" / "data" / "contract-0.1.0.json"
# Type changes that keep the wire format: the private Status became google.rpc.Status
# (same numbers and types for code and message, plus details).
COMPATIBLE_TYPES = {("Status", ".google.rpc.Status")}


@pytest.fixture(scope="module")
def proto(tmp_path_factory) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path_factory.mktemp("proto") / "set.pb"
    googleapis = Path(google.rpc.status_pb2.__file__).resolve().parents[2]
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{googleapis}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        "recserve/v1/recommender.proto",
    ]
    assert protoc.main(args) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]


def comments(f: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {tuple(loc.path): loc.leading_comments for loc in f.source_code_info.location}


def test_style(proto):
    assert re.fullmatch(r"[a-z]+\.v\d+", proto.package), proto.package
    pascal, snake, upper = r"[A-Z][A-Za-z0-9]*", r"[a-z][a-z0-9_]*", r"[A-Z][A-Z0-9_]*"
    for m in proto.message_type:
        assert re.fullmatch(pascal, m.name), m.name
        for f in m.field:
            assert re.fullmatch(snake, f.name), f"{m.name}.{f.name}"
    for e in proto.enum_type:
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", e.name).upper() + "_"
        assert e.value[0].number == 0 and e.value[0].name == prefix + "UNSPECIFIED"
        for v in e.value:
            assert re.fullmatch(upper, v.name) and v.name.startswith(prefix), v.name
    for s in proto.service:
        assert re.fullmatch(pascal, s.name)
        for r in s.method:
            assert re.fullmatch(pascal, r.name), r.name


def test_every_element_is_commented(proto):
    """Every message, field, enum, enum value, service and RPC has a leading
    comment (buf's COMMENTS rules): the proto is the client's documentation."""
    c = comments(proto)
    missing = []
    for i, m in enumerate(proto.message_type):
        if not c.get((4, i), "").strip():
            missing.append(m.name)
        for j, f in enumerate(m.field):
            if not c.get((4, i, 2, j), "").strip():
                missing.append(f"{m.name}.{f.name}")
    for i, e in enumerate(proto.enum_type):
        if not c.get((5, i), "").strip():
            missing.append(e.name)
        for j, v in enumerate(e.value):
            if not c.get((5, i, 2, j), "").strip():
                missing.append(v.name)
    for i, s in enumerate(proto.service):
        if not c.get((6, i), "").strip():
            missing.append(s.name)
        for j, r in enumerate(s.method):
            if not c.get((6, i, 2, j), "").strip():
                missing.append(f"{s.name}.{r.name}")
    assert not missing, f"uncommented: {missing}"


def test_no_change_breaks_the_released_wire_format(proto):
    base = json.loads(BASELINE.read_text())
    messages = {m.name: m for m in proto.message_type}
    for name, fields in base["messages"].items():
        if name == "Status":  # replaced by google.rpc.Status (COMPATIBLE_TYPES)
            continue
        assert name in messages, f"message {name} removed"
        now = {f.name: f for f in messages[name].field}
        numbers = {f.number: f.name for f in messages[name].field}
        for fname, (number, kind, label, type_name) in fields.items():
            assert fname in now, f"{name}.{fname} removed"
            f = now[fname]
            assert f.number == number, f"{name}.{fname} renumbered"
            assert f.type == kind and f.label == label, f"{name}.{fname} retyped"
            was = f".recserve.v1.{type_name}" if type_name else ""
            assert f.type_name == was or (type_name, f.type_name) in COMPATIBLE_TYPES, (
                f"{name}.{fname}: {type_name} -> {f.type_name}"
            )
            assert numbers[number] == fname
    enums = {e.name: {v.name: v.number for v in e.value} for e in proto.enum_type}
    for name, values in base["enums"].items():
        assert values.items() <= enums[name].items(), f"enum {name} changed"
    services = {s.name: {r.name: r for r in s.method} for s in proto.service}
    for name, rpcs in base["services"].items():
        for rpc, (inp, out, cs, ss) in rpcs.items():
            r = services[name][rpc]
            assert (r.input_type.split(".")[-1], r.output_type.split(".")[-1]) == (inp, out)
            assert (r.client_streaming, r.server_streaming) == (cs, ss), f"{name}.{rpc}"


def test_the_breaking_check_catches_a_renumbered_field(proto):
    broken = descriptor_pb2.FileDescriptorProto()
    broken.CopyFrom(proto)
    (req,) = [m for m in broken.message_type if m.name == "RecommendRequest"]
    (k,) = [f for f in req.field if f.name == "k"]
    k.number = 30
    with pytest.raises(AssertionError, match="renumbered"):
        test_no_change_breaks_the_released_wire_format(broken)
