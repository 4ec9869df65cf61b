"""Recommendation models. Importing this package registers every algorithm."""

from recserve.models import ease, factorization, neighbors, popularity  # noqa: F401  (registers)
from recserve.models.base import NotFittedError, Param, Recommender
from recserve.models.registry import algorithms, create, load, load_named, parse_params

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
