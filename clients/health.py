"""`recserve-health`: a gRPC health probe for Docker HEALTHCHECK and Kubernetes probes.

    recserve-health [--target localhost:50051] [--service NAME] [--timeout 2] [--wait 0]

Asks grpc.health.v1.Health/Check. Exit 0 when SERVING, 1 when NOT_SERVING or
the service name is unknown, 2 when the server cannot be reached in time.
`--service ""` (default) is the whole server; `model/<name>` is one model.
`--wait N` retries for up to N seconds (start-up scripts).
"""

from __future__ import annotations

import argparse
import os
import ssl
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def channel_credentials(
    tls_ca: str = "", tls_cert: str = "", tls_key: str = ""
) -> grpc.ChannelCredentials:
    """TLS credentials: `tls_ca` the PEM CA of the server's certificate ("" for
    the system's roots), `tls_cert` + `tls_key` this client's (mutual TLS).
    The files are loaded here first, so one that does not load is a ValueError
    naming it: gRPC only fails every call with UNAVAILABLE, "connections to all
    backends failing", with nothing about the files."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("tls_cert / tls_key: give both or neither")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls_ca:
        try:
            ctx.load_verify_locations(tls_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"tls_ca: {tls_ca} holds no PEM CA certificate ({exc})") from None
    if tls_cert:

        def no_passphrase() -> bytes:  # gRPC takes none; OpenSSL would prompt for it
            raise ValueError("the key is encrypted; gRPC needs it unencrypted")

        try:
            ctx.load_cert_chain(tls_cert, tls_key, password=no_passphrase)
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise ValueError(
                f"tls_cert / tls_key: {tls_cert} and {tls_key} do not load as a PEM "
                f"certificate and its private key ({exc})"
            ) from None
    return grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
        private_key=Path(tls_key).read_bytes() if tls_key else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
    )


def _channel(target: str, tls_ca: str = "", tls_cert: str = "", tls_key: str = "") -> grpc.Channel:
    if not (tls_ca or tls_cert or tls_key):
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, channel_credentials(tls_ca, tls_cert, tls_key))


def check(
    target: str,
    service: str = "",
    timeout: float = 2.0,
    tls_ca: str = "",
    tls_cert: str = "",
    tls_key: str = "",
) -> str:
    """The health status name of `service` at `target` (SERVING, NOT_SERVING, ...).

    Raises grpc.RpcError when the server cannot be reached in time.
    """
    with _channel(target, tls_ca, tls_cert, tls_key) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `recserve-health`."""
    ap = argparse.ArgumentParser(
        prog="recserve-health", allow_abbrev=False, description=__doc__.split("\n\n")[0]
    )
    default_target = f"localhost:{os.environ.get('RECSERVE_PORT', '50051')}"
    ap.add_argument("--target", default=default_target, help=f"default {default_target}")
    ap.add_argument("--service", default="", help="health service name ('' = the server)")
    ap.add_argument("--timeout", type=float, default=2.0, help="seconds per attempt")
    ap.add_argument("--wait", type=float, default=0.0, help="keep retrying for this many seconds")
    ap.add_argument("--tls-ca", default="", help="PEM CA of the server certificate (TLS)")
    ap.add_argument("--tls-cert", default="", help="client certificate (mutual TLS)")
    ap.add_argument("--tls-key", default="", help="client key (mutual TLS)")
    args = ap.parse_args(argv)
    end = time.monotonic() + args.wait
    while True:
        try:
            status = check(
                args.target, args.service, args.timeout, args.tls_ca, args.tls_cert, args.tls_key
            )
        except grpc.RpcError as exc:
            status, rc = f"unreachable ({exc.code().name})", 2
        except ValueError as exc:  # a TLS file that does not load
            ap.error(str(exc))
        else:
            rc = 0 if status == "SERVING" else 1
        if rc == 0 or time.monotonic() >= end:
            print(f"{args.target} {args.service or '(server)'}: {status}")
            return rc
        time.sleep(0.2)


if __name__ == "__main__":
    raise SystemExit(main())
