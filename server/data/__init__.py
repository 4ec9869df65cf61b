"""Interaction data: readers for public formats, the Dataset, and a synthetic generator."""

from server.data.dataset import Dataset, IdMap, build_csr, features_matrix
from server.data.readers import FORMATS, DataError, detect_format, load_dataset
from server.data.synth import generate, to_dataset, write_csv

__all__ = [
    "FORMATS",
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
