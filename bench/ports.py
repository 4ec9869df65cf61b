"""Loopback ports for the servers a benchmark starts (Redis, `recserve serve`'s
gRPC and metrics ports), shared by the benches."""

from __future__ import annotations

import socket

_HELD: list[socket.socket] = []


def held_port() -> int:
    """A loopback port for a server about to start, kept bound until this
    process exits. A port found free and released at once can be handed out
    again before the server binds it (as a connection's local port, or to a
    server binding port 0). Held bound but never listening, with SO_REUSEADDR,
    it goes to nobody else, while a server that sets SO_REUSEADDR too (gRPC,
    prometheus_client, Redis) still binds and listens on it; the tests'
    `service_helpers.free_port` does the same."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return s.getsockname()[1]
