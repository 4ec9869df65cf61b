"""Recommendation models. Importing this package registers every algorithm."""

from server.models import ease, factorization, neighbors, popularity  # noqa: F401  (registers)
from server.models.base import NotFittedError, Param, Recommender
from server.models.registry import algorithms, create, load, load_named, parse_params

__all__ = [
    "NotFittedError",
    "Param",
    "Recommender",
    "algorithms",
    "create",
    "load",
    "load_named",
    "parse_params",
]
