"""Client-side code: imports only the generated stubs (recserve.v1), never server.

`from recserve.clients import RecommenderClient` works as well as the longer
`recserve.clients.client` path; the names load on first use, so importing the
package (as `python -m recserve.clients.bench` does) stays light."""

from __future__ import annotations

from typing import Any

_EXPORTS = (
    "Event",
    "Item",
    "ModelDetails",
    "Rating",
    "Ratings",
    "Recommendation",
    "RecommenderClient",
    "Recorded",
    "RecserveError",
)
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from recserve.clients import client

        return getattr(client, name)
    raise AttributeError(f"module 'recserve.clients' has no attribute {name!r}")
