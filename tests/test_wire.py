"""recserve.kernels.wire and convert.response_bytes against protobuf's own encoder."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recserve.data import IdMap
from recserve.kernels import wire
from recserve.service import convert
from recserve.serving import Prediction, Ranked
from recserve.v1 import recommender_pb2 as pb


def reference(
    ids: list[str], rows: list[int], scores: np.ndarray, std: np.ndarray | None = None
) -> pb.RecommendResponse:
    out = pb.RecommendResponse()
    stds = [0.0] * len(rows) if std is None else std.tolist()
    for pos, (row, score, sd) in enumerate(zip(rows, scores.tolist(), stds, strict=True)):
        out.items.add(item_id=ids[row], score=score, rank=pos + 1, score_std=sd)
    return out


def encode(idmap: IdMap, rows, scores, std=None) -> bytes:
    return wire.encode_ranked(
        idmap.rows,
        np.asarray(rows, np.int32),
        np.asarray(scores, np.float32),
        b"",
        b"",
        2,
        None if std is None else np.asarray(std, np.float32),
    )


ids_strategy = st.lists(
    st.text(min_size=1, max_size=140).filter(lambda s: "\x00" not in s),
    min_size=1,
    max_size=40,
    unique=True,
)


@settings(max_examples=60, deadline=None)
@given(ids=ids_strategy, data=st.data())
def test_items_encode_as_protobuf_does(ids, data):
    """Byte for byte what upb writes: unicode and >127-byte ids (two-byte length
    varints), zero scores (omitted in proto3), any float32, ranks from 1."""
    idmap = IdMap.from_ids(ids)
    known = idmap.ids(np.arange(len(idmap)))
    rows = data.draw(st.lists(st.integers(0, len(idmap) - 1), max_size=30))
    floats = st.floats(width=32, allow_nan=False) | st.sampled_from([0.0, 1.0, -1.5])
    scores = np.array(data.draw(st.lists(floats, min_size=len(rows), max_size=len(rows))))
    scores = scores.astype(np.float32)
    got = encode(idmap, rows, scores)
    assert got == reference(known, rows, scores).SerializeToString()
    # with a predictive std per item (bayes_mf): zeros, -0.0 and any float32 too
    std = np.array(data.draw(st.lists(floats, min_size=len(rows), max_size=len(rows))))
    std = std.astype(np.float32)
    assert (
        encode(idmap, rows, scores, std) == reference(known, rows, scores, std).SerializeToString()
    )


def test_long_rankings_and_negative_zero():
    """Ranks past 127 take a two-byte varint; -0.0 is not the default and is kept."""
    idmap = IdMap.from_ids([f"item-{i:04d}" for i in range(400)])
    rows = np.random.default_rng(0).permutation(400).astype(np.int32)
    scores = np.linspace(5, -5, 400).astype(np.float32)
    scores[7] = -0.0
    got = pb.RecommendResponse.FromString(encode(idmap, rows, scores))
    want = reference(idmap.ids(np.arange(400)), rows.tolist(), scores)
    assert got == want
    assert [it.rank for it in got.items] == list(range(1, 401))
    assert np.signbit(got.items[7].score)


def test_head_and_tail_frame_the_items():
    idmap = IdMap.from_ids(["a", "b"])
    out = wire.encode_ranked(
        idmap.rows, np.array([1], np.int32), np.array([2.0], np.float32), b"\x0a\x01x", b"Z", 2
    )
    assert out == b"\x0a\x01x" + reference(["a", "b"], [1], np.float32([2])).SerializeToString() + (
        b"Z"
    )


def test_memory_mapped_ids(tmp_path):
    ids = np.array(sorted(b"id-%d" % i for i in range(50)), dtype="S")
    np.save(tmp_path / "ids.npy", ids)
    idmap = IdMap(np.load(tmp_path / "ids.npy", mmap_mode="r"))
    rows, scores = [3, 49, 0], np.float32([3, 2, 1])
    assert (
        encode(idmap, rows, scores)
        == reference(idmap.ids(np.arange(50)), rows, scores).SerializeToString()
    )


def test_errors_name_the_argument():
    idmap = IdMap.from_ids(["a", "b"])
    with pytest.raises(IndexError, match="idx: row 2"):
        encode(idmap, [0, 2], [1, 1])
    with pytest.raises(IndexError, match="idx: row -1"):
        encode(idmap, [-1], [1])
    with pytest.raises(ValueError, match="scores: length 1, expected 2"):
        encode(idmap, [0, 1], [1])
    with pytest.raises((TypeError, ValueError), match="ids"):
        wire.encode_ranked(
            np.zeros((2, 2), np.int8), np.zeros(1, np.int32), np.zeros(1, np.float32), b"", b"", 2
        )
    with pytest.raises(ValueError, match="field"):
        wire.encode_ranked(idmap.rows, np.zeros(1, np.int32), np.zeros(1, np.float32), b"", b"", 0)
    with pytest.raises(ValueError, match="std: length 1, expected 2"):
        encode(idmap, [0, 1], [1, 1], [0.5])
    with pytest.raises((TypeError, ValueError), match="std"):
        wire.encode_ranked(
            idmap.rows, np.zeros(1, np.int32), np.zeros(1, np.float32), b"", b"", 2, np.zeros(1)
        )


@pytest.mark.parametrize(
    "meta",
    [
        {},
        {"served_by": "popularity", "arm": "b"},
        {"model": "als", "version": "20261123-ab\u00e9"},
    ],
)
@pytest.mark.parametrize("request_id", ["", "req-\u4e00-1"])
def test_response_bytes_equals_the_message(meta, request_id):
    """The array-backed answer serializes exactly as convert.response's message,
    and a list-backed one (explanations) still goes through the message."""
    idmap = IdMap.from_ids([f"m{i:02d}" for i in range(30)])
    rows = np.array([29, 4, 11, 0], np.int32)
    scores = np.array([0.9, 0.5, 0.0, -0.25], np.float64)  # any float dtype
    r = Ranked.of(idmap, rows, scores, meta.get("version", "v1"))
    r.model = meta.get("model", "")
    r.served_by = meta.get("served_by", "")
    r.arm = meta.get("arm", "")
    encoded = convert.response_bytes(request_id, r)
    assert isinstance(encoded, bytes)
    message = convert.response(request_id, r)
    assert encoded == message.SerializeToString()
    assert pb.RecommendResponse.FromString(encoded) == message
    assert [it.item_id for it in message.items] == ["m29", "m04", "m11", "m00"]

    # bayes_mf's answer carries a std per item: still bytes, still the message's
    r.std = [0.25, 0.0, -0.0, 1e-3]
    encoded = convert.response_bytes(request_id, r)
    assert isinstance(encoded, bytes)
    assert encoded == convert.response(request_id, r).SerializeToString()
    assert [it.score_std for it in pb.RecommendResponse.FromString(encoded).items] == pytest.approx(
        r.std
    )

    explained = Ranked(["m1"], [0.5], because=[["m2"]], version="v1")
    assert isinstance(convert.response_bytes(request_id, explained), pb.RecommendResponse)


def test_ranked_of_makes_ids_and_scores_only_when_read():
    idmap = IdMap.from_ids(["x", "y", "z"])
    r = Ranked.of(idmap, np.array([2, 0], np.int32), np.float32([1.5, 0.25]), "v")
    assert len(r) == 2 and r._item_ids is None and r._scores is None
    assert r.item_ids == ["z", "x"] and r.scores == [1.5, 0.25]
    assert len(Ranked([], [])) == 0


def test_the_tags_written_are_the_descriptors_and_a_mismatch_is_refused():
    """The tag bytes the encoder writes (read back from the kernel) carry the field
    numbers and wire types of the generated RankedItem, and check_layout refuses a
    descriptor whose numbers or types differ from them."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    tags = wire.written_tags()
    fields = pb.RankedItem.DESCRIPTOR.fields_by_name
    assert {n: t >> 3 for n, t in tags.items()} == {n: fields[n].number for n in tags}
    assert {n: t & 7 for n, t in tags.items()} == {
        "item_id": 2,
        "score": 5,
        "rank": 0,
        "score_std": 5,
    }
    numbers = wire.check_layout(pb.RankedItem.DESCRIPTOR, pb.RecommendResponse.DESCRIPTOR)
    assert numbers["items"] == pb.RecommendResponse.DESCRIPTOR.fields_by_name["items"].number

    def variant(name: str, number: int, kind: int):
        """A RankedItem whose field `name` has another number or type."""
        proto = descriptor_pb2.FileDescriptorProto()
        pb.DESCRIPTOR.CopyToProto(proto)
        proto.name, proto.package = "variant.proto", "variant"
        (item,) = [m for m in proto.message_type if m.name == "RankedItem"]
        (field,) = [f for f in item.field if f.name == name]
        field.number, field.type = number, kind
        for m in proto.message_type:
            for f in m.field:
                if f.HasField("type_name"):
                    f.type_name = f.type_name.replace(".recserve.v1.", ".variant.")
        del proto.service[:]
        pool = descriptor_pool.DescriptorPool()
        added: set[str] = set()

        def add(file) -> None:  # a file after its own imports
            if file.name in added:
                return
            for dep in file.dependencies:
                add(dep)
            dep_proto = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(dep_proto)
            pool.Add(dep_proto)
            added.add(file.name)

        for dep in pb.DESCRIPTOR.dependencies:
            add(dep)
        pool.Add(proto)
        return pool.FindMessageTypeByName("variant.RankedItem"), pool.FindMessageTypeByName(
            "variant.RecommendResponse"
        )

    t = descriptor_pb2.FieldDescriptorProto
    for name, number, kind in (
        ("rank", 16, t.TYPE_INT32),  # renumbered
        ("score", 2, t.TYPE_DOUBLE),  # another wire type (fixed64)
        ("item_id", 1, t.TYPE_INT32),  # a varint where bytes are written
    ):
        item, response = variant(name, number, kind)
        with pytest.raises(RuntimeError, match=f"RankedItem.{name} no longer matches"):
            wire.check_layout(item, response)
    item, response = variant("item_id", 1, t.TYPE_STRING)  # the same layout: accepted
    assert wire.check_layout(item, response)["items"] == numbers["items"]


def prediction(ids: list[str], values: np.ndarray, interval: float, meta: dict) -> Prediction:
    v = np.asarray(values, np.float64)
    return Prediction(
        ids,
        v[:, 0],
        v[:, 1],
        v[:, 2],
        v[:, 3],
        interval,
        model=meta.get("model", ""),
        version=meta.get("version", ""),
        served_by=meta.get("served_by", ""),
    )


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.text(max_size=140), max_size=40),
    data=st.data(),
    interval=st.sampled_from([0.95, 0.5, 0.0, -0.0, 1e-300]),
    meta=st.sampled_from([{}, {"model": "svd", "version": "v\u00e9", "served_by": "bayes_mf"}]),
)
def test_predictions_encode_as_protobuf_does(ids, data, interval, meta):
    """PredictRatings' bytes are upb's bytes for the same message: unicode, empty
    and >127-byte ids, zeros omitted (+0.0) or kept (-0.0), every float32, the
    interval (a double) and the names after the items."""
    floats = st.floats(width=32, allow_nan=False) | st.sampled_from([0.0, -0.0, 1.0])
    values = np.array(
        data.draw(st.lists(floats, min_size=4 * len(ids), max_size=4 * len(ids))), np.float32
    ).reshape(len(ids), 4)
    p = prediction(ids, values, interval, meta)
    encoded = convert.predictions(p)
    assert encoded == convert.predictions_message(p).SerializeToString()
    back = pb.PredictRatingsResponse.FromString(encoded)
    assert [x.item_id for x in back.predictions] == ids
    assert back.model == meta.get("model", "") and back.interval == interval


def test_predictions_of_many_items_round_trip():
    ids = [f"item-{i:05d}" for i in range(3000)]
    values = np.random.default_rng(1).normal(3, 1, (3000, 4))
    p = prediction(ids, values, 0.9, {"model": "bayes_mf", "version": "3"})
    encoded = convert.predictions(p)
    assert encoded == convert.predictions_message(p).SerializeToString()
    back = pb.PredictRatingsResponse.FromString(encoded)
    got = np.array([[x.rating, x.std, x.lower, x.upper] for x in back.predictions])
    np.testing.assert_array_equal(got, values.astype(np.float32))


def test_prediction_errors_and_layout_checks():
    with pytest.raises(TypeError, match="item_ids: position 1 is int"):
        wire.encode_predictions(["a", 7], np.zeros((2, 4), np.float32), b"", b"", 1)
    with pytest.raises(ValueError, match="values: shape"):
        wire.encode_predictions(["a"], np.zeros((1, 3), np.float32), b"", b"", 1)
    with pytest.raises(ValueError, match="values: shape"):
        wire.encode_predictions(["a", "b"], np.zeros((1, 4), np.float32), b"", b"", 1)
    with pytest.raises((TypeError, ValueError), match="values"):
        wire.encode_predictions(["a"], np.zeros((1, 4), np.float64), b"", b"", 1)
    with pytest.raises(ValueError, match="field"):
        wire.encode_predictions(["a"], np.zeros((1, 4), np.float32), b"", b"", 0)
    tags = wire.written_prediction_tags()
    fields = pb.RatingPrediction.DESCRIPTOR.fields_by_name
    assert {n: t >> 3 for n, t in tags.items()} == {n: fields[n].number for n in tags}
    assert {n: t & 7 for n, t in tags.items()} == {
        "item_id": 2,
        "rating": 5,
        "std": 5,
        "lower": 5,
        "upper": 5,
    }
    numbers = wire.check_prediction_layout(
        pb.RatingPrediction.DESCRIPTOR, pb.PredictRatingsResponse.DESCRIPTOR
    )
    assert numbers["predictions"] == 1 and numbers["interval"] == 2
    with pytest.raises(RuntimeError, match=r"RatingPrediction\.rating no longer matches"):
        wire.check_prediction_layout(pb.RankedItem.DESCRIPTOR, pb.PredictRatingsResponse.DESCRIPTOR)
    with pytest.raises(RuntimeError, match="predictions is no longer RatingPrediction"):
        wire.check_prediction_layout(
            pb.RatingPrediction.DESCRIPTOR, pb.RecommendResponse.DESCRIPTOR
        )


@pytest.mark.parametrize(
    "meta", [{}, {"model": "hybrid", "version": "als@1,itemknn@2", "served_by": "x", "arm": "b"}]
)
def test_similar_bytes_equals_the_message(meta):
    """GetSimilarItems' array-backed answer serializes exactly as its message."""
    idmap = IdMap.from_ids([f"s{i:03d}" for i in range(200)])
    rows = np.random.default_rng(2).permutation(200)[:150].astype(np.int32)  # ranks past 127
    scores = np.linspace(1, -1, 150)
    scores[3] = 0.0
    r = Ranked.of(idmap, rows, scores, meta.get("version", "v1"))
    r.model, r.served_by, r.arm = (
        meta.get("model", ""),
        meta.get("served_by", ""),
        meta.get("arm", ""),
    )
    encoded = convert.similar_bytes(r)
    assert isinstance(encoded, bytes)
    message = convert.similar_response(r)
    assert encoded == message.SerializeToString()
    assert pb.SimilarItemsResponse.FromString(encoded) == message
    listed = Ranked(["s1", "s2"], [0.5, 0.25], version="v1")
    assert isinstance(convert.similar_bytes(listed), pb.SimilarItemsResponse)
