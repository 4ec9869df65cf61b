"""Bundles: atomic publish, verification, memory-mapped load, refusal of bad bundles."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from recserve.models import bundle
from recserve.models.bundle import BundleError
from tests.service_helpers import flip_byte


def publish(tmp_path, name="m", **arrays):
    arrays = arrays or {"a": np.arange(10, dtype=np.float32), "ids": np.array([b"x", b"yy"])}
    return bundle.publish(tmp_path, name, {"algorithm": "test", "params": {}}, arrays)


def test_round_trip_is_memory_mapped_and_current_moves(tmp_path):
    first = publish(tmp_path)
    second = publish(tmp_path, a=np.ones(3, np.int64), empty=np.zeros(0, np.float32))
    assert bundle.resolve(tmp_path, "m") == second
    assert bundle.resolve(tmp_path, "m", first.name) == first
    doc = bundle.verify(second)
    arrays = bundle.load_arrays(second, doc)
    a = arrays["a"]
    # File-backed (its base is the mapping), read-only, but a plain ndarray view.
    assert type(a) is np.ndarray and isinstance(a.base, np.memmap)
    assert not a.flags.writeable
    np.testing.assert_array_equal(arrays["a"], np.ones(3))
    assert arrays["empty"].shape == (0,)
    assert doc["files"]["a.npy"]["sha256"] == bundle.sha256_file(second / "a.npy")
    listing = bundle.list_bundles(tmp_path)
    assert listing[0]["current"] == second.name and len(listing[0]["versions"]) == 2
    assert first.name < second.name  # versions sort by time


@pytest.mark.parametrize(
    "damage, message",
    [
        (flip_byte, "sha256 differs"),
        (lambda p: p.write_bytes(p.read_bytes()[:-4]), "truncated or changed"),
        (os.remove, "missing"),
    ],
)
def test_damaged_file_is_refused_naming_it(tmp_path, damage, message):
    path = publish(tmp_path)
    damage(path / "a.npy")
    with pytest.raises(BundleError, match=message) as info:
        bundle.verify(path)
    assert "a.npy" in str(info.value)


def test_bad_manifest_is_refused(tmp_path):
    path = publish(tmp_path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest\.json: unreadable"):
        bundle.verify(path)
    (path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(BundleError, match="format_version 99"):
        bundle.verify(path)


def test_pickled_array_is_never_unpickled(tmp_path):
    """A .npy holding a pickle (with a correct hash) is refused, and never executed."""
    path = publish(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    np.save(path / "a.npy", np.array([Evil()], dtype=object), allow_pickle=True)
    doc = json.loads((path / "manifest.json").read_text())
    doc["files"]["a.npy"] = {
        "sha256": bundle.sha256_file(path / "a.npy"),
        "bytes": (path / "a.npy").stat().st_size,
    }
    (path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=r"a\.npy"):
        bundle.load_arrays(path, bundle.verify(path))
    assert not marker.exists()


def test_object_arrays_are_refused_at_publish(tmp_path):
    with pytest.raises(TypeError, match="object arrays cannot be stored"):
        publish(tmp_path, bad=np.array(["x", 1], dtype=object))


def test_failed_publish_leaves_nothing_and_keeps_current(tmp_path):
    good = publish(tmp_path)

    def broken_writer(path):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        bundle.publish(
            tmp_path,
            "m",
            {"algorithm": "t"},
            {"a": np.ones(2)},
            files={"index.faiss": broken_writer},
        )
    assert bundle.resolve(tmp_path, "m") == good
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted([good.name, "current"])


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".", "x" * 65, "-lead"])
def test_names_are_never_paths(tmp_path, name):
    with pytest.raises(ValueError, match="model name"):
        bundle.publish(tmp_path, name, {}, {})
    with pytest.raises(ValueError, match="model name"):
        bundle.resolve(tmp_path, name)


def test_unpublished_model_and_missing_version(tmp_path):
    with pytest.raises(BundleError, match="no current version"):
        bundle.resolve(tmp_path, "nothing")
    publish(tmp_path)
    with pytest.raises(BundleError, match="version folder is missing"):
        bundle.resolve(tmp_path, "m", "20000101T000000000000Z")


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.zeros((0, 5), np.int32),
        np.array(5.0),
        np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
        np.array([b"ab", b"c", b""], dtype="S4"),
        np.arange(3, dtype=">u2"),
        np.array([True, False]),
    ],
    ids=["f4-2d", "empty", "scalar", "fortran", "bytes", "big-endian", "bool"],
)
@pytest.mark.parametrize("mmap", [True, False])
def test_read_npy_equals_np_load(tmp_path, array, mmap):
    path = tmp_path / "a.npy"
    np.save(path, array)
    got = bundle.read_npy(path, mmap=mmap)
    want = np.load(path)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert got.flags.f_contiguous == want.flags.f_contiguous


def test_read_npy_refuses_what_is_not_a_plain_array(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.zeros(3, dtype=[("a", "<i4"), ("b", "<f4")]))
    with pytest.raises(ValueError, match=r"unexpected \.npy header"):
        bundle.read_npy(path)
    np.save(path, np.array([1, "x"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain numeric or bytes dtype"):
        bundle.read_npy(path)
    np.save(path, np.arange(10, dtype=np.float32))
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="bytes, the header describes"):
        bundle.read_npy(path)
    path.write_bytes(b"\x93NUMPX" + bytes(10))
    with pytest.raises(ValueError, match=r"no \.npy magic"):
        bundle.read_npy(path)


def test_bundles_load_concurrently_under_collector_pressure(tmp_path):
    """Many threads load bundles at once while the garbage collector runs Python
    finalizers mid-allocation: the conditions under which np.load's header parse
    (ast.literal_eval) fails on CPython 3.11 with "AST constructor recursion
    depth mismatch". Every load must succeed and map the right arrays."""
    import gc
    import sys
    import threading

    rng = np.random.default_rng(0)
    arrays = {f"a{i}": rng.random((50, 8)).astype(np.float32) for i in range(12)}
    path = publish(tmp_path, "m", **arrays)
    doc = bundle.verify(path, full=False)

    class Cycle:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            sum(range(50))  # Python code the collector runs, letting other threads in

    errors: list[BaseException] = []
    loads = [0]

    def load() -> None:
        try:
            for _ in range(150):
                got = bundle.load_arrays(path, doc)
                assert all(np.array_equal(got[k], v) for k, v in arrays.items())
                loads[0] += 1
                Cycle()
        except BaseException as exc:
            errors.append(exc)

    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(5, 1, 1)
    try:
        threads = [threading.Thread(target=load) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        sys.setswitchinterval(interval)
        gc.set_threshold(*thresholds)
    assert not [t for t in threads if t.is_alive()]
    assert errors == [], errors[:3]
    assert loads[0] == 6 * 150
