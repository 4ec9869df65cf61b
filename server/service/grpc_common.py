"""What both gRPC transports share: status mapping, registration, binding, TLS.

Services are registered with request parsers that never raise (bad bytes are
answered INVALID_ARGUMENT, not gRPC's INTERNAL "Exception deserializing"),
plus grpc.health.v1 and server reflection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from recserve.config import ServerConfig, bind_failure
from recserve.service import convert
from recserve.service.core import Code, Failure
from recserve.v1 import recommender_pb2 as pb

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["Recommender"].full_name,
    pb.DESCRIPTOR.services_by_name["Admin"].full_name,
)
OVERALL = ""  # the health name of the whole server
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

STATUS = {code: getattr(grpc.StatusCode, code.name) for code in Code}


def status(f: Failure) -> tuple[grpc.StatusCode, str, tuple[tuple[str, Any], ...]]:
    """The gRPC status, details and trailing metadata (the google.rpc.Status,
    and the retry pushback) of a Failure."""
    return STATUS[f.code], str(f), convert.status_trailer(f)


# The shipped client config pings every 30 s on idle connections
# (recserve/clients/service_config.json); the server must allow that, or it
# answers the pings with GOAWAY "too_many_pings".
CLIENT_PING_MS = 30_000


def server_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    """Channel options of both server kinds."""
    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        # Several worker processes share the port; one process must fail to
        # bind a taken port instead of silently sharing it.
        ("grpc.so_reuseport", 1 if cfg.workers > 1 else 0),
        # Keepalive: accept the clients' pings (one per CLIENT_PING_MS, also idle).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", CLIENT_PING_MS // 3),
        ("grpc.http2.max_ping_strikes", 0),
        # Calls core holds before the server takes them in: past the limit core
        # cancels new ones at random (all past the hard limit), before the
        # server's own admission can refuse them as the contract says.
        ("grpc.server.max_pending_requests", cfg.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", 2 * cfg.max_pending_calls),
    ]
    if cfg.max_connection_age_s > 0:
        # A connection is closed (GOAWAY, calls in flight finish within the grace)
        # after its age, so clients reconnect and spread onto replicas added since.
        options += [
            ("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(cfg.max_connection_age_grace_s * 1000)),
        ]
    return options


def credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (mutual when tls_client_ca is set) from the configured PEM files, or None."""
    if not cfg.tls_cert:
        return None
    ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def _add_services(server: Any, recommender: Any, admin: Any, registered: bool) -> None:
    for service, impl in (("Recommender", recommender), ("Admin", admin)):
        desc = pb.DESCRIPTOR.services_by_name[service]
        handlers = {}
        for method in desc.methods:
            kind = (
                ("stream" if method.client_streaming else "unary")
                + "_"
                + ("stream" if method.server_streaming else "unary")
            )
            make = getattr(grpc, f"{kind}_rpc_method_handler")
            handlers[method.name] = make(
                getattr(impl, method.name),
                request_deserializer=convert.parser(getattr(pb, method.input_type.name)),
                response_serializer=convert.serialize,
            )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(desc.full_name, handlers),)
        )
        if registered:
            server.add_registered_method_handlers(desc.full_name, handlers)


def register(
    server: Any,
    cfg: ServerConfig,
    recommender: Any,
    admin: Any,
    health: Any,
    registered: bool = True,
) -> int:
    """Add every service, health and reflection to a (sync or asyncio) server and
    bind it; returns the port. OSError naming the address when it cannot bind.

    `registered=False` leaves recserve's methods generic, served from one queue
    in arrival order. grpc.aio takes in one new call per registered method per
    loop turn, so under overload the frequent method (Recommend) waits in gRPC's
    per-method queue while rarer, heavier ones are taken at once; generic, every
    call reaches the handler, where admission can refuse it (measured,
    docs/performance.md: at twice the maximum 1 DEADLINE_EXCEEDED against 2,515)."""
    _add_services(server, recommender, admin, registered)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{cfg.host}:{cfg.port}"
    try:
        creds = credentials(cfg)
        port = (
            server.add_secure_port(address, creds)
            if creds is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError as exc:
        raise OSError(bind_failure(cfg.host, address, str(exc))) from None
    if port == 0:
        raise OSError(bind_failure(cfg.host, address, ""))
    return port
