"""Model bundles: publish, verify and load, memory-mapped and unable to run code.

A bundle is a folder MODELS/<name>/<version>/ holding manifest.json and plain
files (.npy arrays, later FAISS indexes). The manifest records the sha256 and
size of every file. Publishing writes a temporary folder, fsyncs it and
renames it into place, then atomically replaces MODELS/<name>/current, so a
reader sees the old version or the new one, never half of one. Arrays are
memory-mapped read-only: loading costs milliseconds and processes share the
pages. Only plain numeric and bytes arrays are stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from recserve.config import NAME_RE

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "current"


class BundleError(Exception):
    """A bundle that must not be served; the message names the bundle and the file."""


def check_name(name: str) -> str:
    """A model name safe to use as one path component; raise ValueError otherwise."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise ValueError(
            f"model name {name!r}: use 1-64 letters, digits, '_', '-', '.', "
            "starting with a letter or digit"
        )
    return name


def new_version() -> str:
    """A sortable, unique version string (UTC time to the microsecond)."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, payload: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def publish(
    models_dir: str | Path,
    name: str,
    manifest: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    files: Mapping[str, Callable[[Path], None]] | None = None,
    make_current: bool = True,
) -> Path:
    """Write a new bundle version atomically and (by default) point `current` at it.

    `arrays` become <key>.npy; `files` maps a file name to a function that
    writes that file (used for FAISS indexes). Returns the version folder.
    """
    check_name(name)
    root = Path(models_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    version = new_version()
    while (root / version).exists():  # two publishes in the same microsecond
        time.sleep(1e-6)
        version = new_version()
    tmp = root / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        entries: dict[str, dict[str, Any]] = {}
        array_meta: dict[str, dict[str, Any]] = {}
        for key, arr in arrays.items():
            check_name(key)
            arr = np.ascontiguousarray(arr)
            if arr.dtype.hasobject:
                # Object arrays can only be stored by pickling, and loading a
                # pickle runs code: never stored, so never loaded either.
                raise TypeError(f"array {key}: object arrays cannot be stored in a bundle")
            fname = f"{key}.npy"
            np.save(tmp / fname, arr)  # plain dtypes only (checked above)
            array_meta[key] = {"file": fname, "dtype": arr.dtype.str, "shape": list(arr.shape)}
        for fname, writer in (files or {}).items():
            check_name(fname)
            writer(tmp / fname)
        for path in sorted(tmp.iterdir()):
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
            entries[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        doc = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": version,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **dict(manifest),
            "arrays": array_meta,
            "files": entries,
        }
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, sort_keys=True, default=_json_default)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        final = root / version
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if make_current:
        set_current(models_dir, name, version)
    return final


def _json_default(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def set_current(models_dir: str | Path, name: str, version: str) -> None:
    """Atomically point MODELS/<name>/current at an existing version."""
    root = Path(models_dir) / check_name(name)
    if not (root / check_name(version) / MANIFEST).is_file():
        raise BundleError(f"{root / version}: no such bundle version")
    _write_json_atomic(root / CURRENT, version + "\n")


def resolve(models_dir: str | Path, name: str, version: str | None = None) -> Path:
    """The folder of `name`'s given version, or of its current version."""
    root = Path(models_dir) / check_name(name)
    if version is None:
        pointer = root / CURRENT
        if not pointer.is_file():
            raise BundleError(f"{root}: no {CURRENT} version (nothing published?)")
        version = pointer.read_text(encoding="utf-8").strip()
    path = root / check_name(version)
    if not path.is_dir():
        raise BundleError(f"{path}: version folder is missing")
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a bundle folder; BundleError if absent or malformed."""
    mpath = Path(path) / MANIFEST
    try:
        doc = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{mpath}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{mpath}: unreadable ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        got = doc.get("format_version") if isinstance(doc, dict) else None
        raise BundleError(f"{mpath}: format_version {got!r}, this recserve reads {FORMAT_VERSION}")
    for key in ("algorithm", "arrays", "files"):
        if key not in doc:
            raise BundleError(f"{mpath}: no {key!r} entry")
    return doc


def verify(path: str | Path, full: bool = True) -> dict[str, Any]:
    """Check every file the manifest lists: present, right size and (full) right sha256.

    Returns the manifest. Raises BundleError naming the first bad file.
    """
    folder = Path(path)
    doc = read_manifest(folder)
    for fname, entry in doc["files"].items():
        check_name(fname)
        fpath = folder / fname
        if not fpath.is_file():
            raise BundleError(f"{fpath}: missing (listed in the manifest)")
        size = fpath.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(
                f"{fpath}: {size} bytes, manifest says {entry['bytes']} (truncated or changed)"
            )
        if full and sha256_file(fpath) != entry["sha256"]:
            raise BundleError(f"{fpath}: sha256 differs from the manifest (changed)")
    for key, meta in doc["arrays"].items():
        if meta["file"] not in doc["files"]:
            raise BundleError(f"{folder / meta['file']}: array {key} not in the file list")
    return doc


_NPY_MAGIC = b"\x93NUMPY"
# The header np.save writes: a dict literal with these three keys in this order,
# padded with spaces to a 64-byte boundary and ended by a newline.
_NPY_HEADER = re.compile(
    r"\{'descr': '([<>|=][A-Za-z][0-9]*)', 'fortran_order': (True|False), "
    r"'shape': \(((?:\d+, )*\d*,?)\), \} *\n?"
)


def read_npy(path: str | Path, mmap: bool = True) -> np.ndarray:
    """A plain .npy array, memory-mapped read-only (or read), without np.load.

    np.load parses the header with ast.literal_eval, and CPython 3.11 keeps that
    parser's recursion counter per interpreter: two threads loading bundles at
    once can fail with "AST constructor recursion depth mismatch" when a garbage
    collection runs Python code mid-parse (tests/test_artifacts.py reproduces
    it). The format is small and specified (numpy.lib.format): magic, version,
    header length, a dict literal naming dtype, order and shape, then the data.
    Only simple dtypes are taken (no object arrays: nothing is ever unpickled),
    and the file must hold exactly the data the header promises."""
    path = Path(path)
    with open(path, "rb") as f:
        lead = f.read(8)
        if len(lead) < 8 or lead[:6] != _NPY_MAGIC:
            raise ValueError("no .npy magic")
        major = lead[6]
        if major == 1:
            (length,), width = np.frombuffer(f.read(2), "<u2"), 2
        elif major in (2, 3):
            (length,), width = np.frombuffer(f.read(4), "<u4"), 4
        else:
            raise ValueError(f".npy format version {major} is unknown")
        raw = f.read(int(length))
    if len(raw) != int(length):
        raise ValueError("truncated .npy header")
    header = raw.decode("utf-8" if major == 3 else "latin1")
    m = _NPY_HEADER.fullmatch(header)
    if m is None:
        raise ValueError(f"unexpected .npy header {header.strip()!r}")
    dtype = np.dtype(m.group(1))
    if dtype.hasobject or dtype.fields is not None:
        raise ValueError(f"dtype {dtype.str} is not a plain numeric or bytes dtype")
    shape = tuple(int(x) for x in m.group(3).replace(",", " ").split())
    order = "F" if m.group(2) == "True" else "C"
    offset = 8 + width + int(length)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != offset + nbytes:
        raise ValueError(f"{size} bytes, the header describes {offset + nbytes}")
    if nbytes == 0:
        return np.zeros(shape, dtype, order=order)
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
    with open(path, "rb") as f:
        f.seek(offset)
        data = np.fromfile(f, dtype=dtype, count=nbytes // dtype.itemsize)
    return data.reshape(shape, order=order)


def load_arrays(
    path: str | Path, doc: Mapping[str, Any], mmap: bool = True
) -> dict[str, np.ndarray]:
    """Map (or read) every array of a verified bundle, checking dtype and shape."""
    folder = Path(path)
    out: dict[str, np.ndarray] = {}
    for key, meta in doc["arrays"].items():
        fpath = folder / meta["file"]
        mode = "r" if mmap else None
        try:
            # A pickled (object) array is refused, never executed (see
            # tests/test_artifacts.py::test_pickled_array_is_never_unpickled).
            arr = read_npy(fpath, mmap=mode is not None)
        except (ValueError, OSError, EOFError) as exc:
            raise BundleError(f"{fpath}: not a plain .npy array ({exc})") from None
        if arr.dtype.str != meta["dtype"] or list(arr.shape) != meta["shape"]:
            raise BundleError(
                f"{fpath}: dtype/shape {arr.dtype.str}{list(arr.shape)} differ "
                f"from the manifest's {meta['dtype']}{meta['shape']}"
            )
        # A plain (read-only, still file-backed) view: np.memmap's per-index
        # __getitem__/__array_finalize__ cost tens of microseconds per request.
        out[key] = np.asarray(arr)
    return out


def bundle_bytes(doc: Mapping[str, Any]) -> int:
    """Total bytes of a bundle's files."""
    return int(sum(e["bytes"] for e in doc["files"].values()))


def versions(model: Path) -> list[str]:
    """A model folder's version names, oldest first (they are UTC timestamps);
    hidden folders (a publish or a prune in progress) are none."""
    return sorted(p.name for p in model.iterdir() if p.is_dir() and not p.name.startswith("."))


def current_version(model: Path) -> str | None:
    """The version a model folder's `current` names (None: nothing published)."""
    pointer = model / CURRENT
    return pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prune(models_dir: str | Path, name: str, keep: int, dry_run: bool = False) -> dict[str, Any]:
    """Delete `name`'s old versions: all but the current one and the `keep`
    newest others (kept to roll back to). A version leaves in one rename
    (to a hidden folder, then removed), so a loader sees it whole or not at
    all; a server that has it mapped keeps serving it until its next reload.
    Without a current version nothing is deleted."""
    if keep < 0:
        raise ValueError(f"keep: must be >= 0, got {keep}")
    model = Path(models_dir) / check_name(name)
    current = current_version(model)
    if current is None:
        raise BundleError(f"{model}: no {CURRENT} version; nothing pruned")
    others = [v for v in versions(model) if v != current]
    cut = max(0, len(others) - keep)  # others[:cut] go, the newest `keep` stay
    kept = [current, *others[cut:]]
    removed = []
    for v in others[:cut]:
        path = model / v
        size = _folder_bytes(path)
        if not dry_run:
            trash = model / f".prune-{v}-{uuid.uuid4().hex[:8]}"
            os.rename(path, trash)
            shutil.rmtree(trash)
        removed.append({"version": v, "bytes": size})
    if removed and not dry_run:
        _fsync_dir(model)
    return {"name": name, "current": current, "kept": sorted(kept), "removed": removed}


def rollback(models_dir: str | Path, name: str, version: str | None = None) -> dict[str, Any]:
    """Point `name`'s `current` at `version` (default: the newest one older than
    the current), after verifying every file of it; a server switches on its
    next reload. A version that fails verification is refused, `current`
    unchanged."""
    model = Path(models_dir) / check_name(name)
    current = current_version(model)
    if version is None:
        older = [v for v in versions(model) if current is None or v < current]
        if not older:
            raise BundleError(f"{model}: no version older than {current} to roll back to")
        version = older[-1]
    verify(model / check_name(version), full=True)
    set_current(models_dir, name, version)
    return {"name": name, "from": current, "to": version}


def list_bundles(models_dir: str | Path) -> list[dict[str, Any]]:
    """Every model under MODELS with its versions and current version."""
    root = Path(models_dir)
    out = []
    if not root.is_dir():
        return out
    for model in sorted(p for p in root.iterdir() if p.is_dir() and NAME_RE.match(p.name)):
        current = current_version(model)
        entry: dict[str, Any] = {
            "name": model.name,
            "current": current,
            "versions": versions(model),
        }
        if current:
            try:
                doc = read_manifest(model / current)
                entry.update(
                    algorithm=doc["algorithm"],
                    bytes=bundle_bytes(doc),
                    created=doc.get("created"),
                    metrics=doc.get("metrics", {}),
                )
                if "baseline" in doc:  # popularity on the same split (train)
                    entry["baseline"] = doc["baseline"]
            except BundleError as exc:
                entry["error"] = str(exc)
        out.append(entry)
    return out
