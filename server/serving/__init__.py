"""The serving path, free of any transport: catalogue, router, blend, answers."""

from recserve.serving.answers import (
    MAX_ID_BYTES,
    Prediction,
    Ranked,
    RecQuery,
    RequestError,
)
from recserve.serving.catalog import FAILED, LOADING, SERVING, Catalog, Loader, Slot, default_loader
from recserve.serving.router import BUILTIN, Router, assign_arm

__all__ = [
    "BUILTIN",
    "FAILED",
    "LOADING",
    "MAX_ID_BYTES",
    "SERVING",
    "Catalog",
    "Loader",
    "Prediction",
    "Ranked",
    "RecQuery",
    "RequestError",
    "Router",
    "Slot",
    "assign_arm",
    "default_loader",
]
