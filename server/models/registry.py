"""Algorithm name -> model class, and loading any bundle by its manifest."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recserve.models import bundle

if TYPE_CHECKING:
    from recserve.models.base import Recommender

MODELS: dict[str, type[Recommender]] = {}


def register(cls: type[Recommender]) -> type[Recommender]:
    """Class decorator: make an algorithm available by its name."""
    if not cls.algorithm or cls.algorithm in MODELS:
        raise ValueError(f"algorithm name {cls.algorithm!r} missing or registered twice")
    MODELS[cls.algorithm] = cls
    return cls


def algorithms() -> list[str]:
    """Names of every registered algorithm."""
    return sorted(MODELS)


def create(algorithm: str, **params: Any) -> Recommender:
    """A new, unfitted model of `algorithm` with `params` (strings are parsed)."""
    try:
        cls = MODELS[algorithm]
    except KeyError:
        raise ValueError(
            f"algo: unknown algorithm {algorithm!r}; available: {', '.join(algorithms())}"
        ) from None
    return cls(**params)


def parse_params(pairs: Iterable[str]) -> dict[str, str]:
    """`key=value` strings (from --param) as a dict; ValueError names a malformed one."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"param: expected key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def load(path: str | Path, verify: bool = True, mmap: bool = True) -> Recommender:
    """Load a bundle folder: verify its files (sha256 when `verify`), then map its arrays."""
    folder = Path(path)
    doc = bundle.verify(folder, full=verify)
    cls = MODELS.get(doc["algorithm"])
    if cls is None:
        raise bundle.BundleError(f"{folder}: unknown algorithm {doc['algorithm']!r}")
    model = cls.from_bundle(folder, doc, mmap=mmap)
    model.manifest = dict(doc)
    return model


def load_named(
    models_dir: str | Path, name: str, version: str | None = None, verify: bool = True
) -> Recommender:
    """Load `name`'s current (or given) version from a models folder."""
    return load(bundle.resolve(models_dir, name, version), verify=verify)
