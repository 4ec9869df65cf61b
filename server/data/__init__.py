"""Interaction data: readers for public formats, the Dataset, and a synthetic generator."""

from typing import Any

from recserve.data.dataset import MAX_VALUE, Dataset, IdMap, build_csr, features_matrix
from recserve.data.formats import FORMATS, DataError
from recserve.data.synth import generate, to_dataset, write_csv

# The readers need pyarrow (~75 ms to import); a serving process never reads a
# dataset, so they are imported on first use (PEP 562).
_READERS = ("detect_format", "load_dataset")


def __getattr__(name: str) -> Any:
    if name in _READERS:
        from recserve.data import readers

        return getattr(readers, name)
    raise AttributeError(f"module 'recserve.data' has no attribute {name!r}")


__all__ = [
    "FORMATS",
    "MAX_VALUE",
    "DataError",
    "Dataset",
    "IdMap",
    "build_csr",
    "detect_format",
    "features_matrix",
    "generate",
    "load_dataset",
    "to_dataset",
    "write_csv",
]
