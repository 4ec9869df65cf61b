"""Who may call: bearer tokens (constant-time) and the loopback rule for Admin.

Admin RPCs need `authorization: Bearer <admin_token>` when a token is set; with
none set they answer only loopback peers, so a server bound to every address
cannot be reloaded by whoever reaches its port. With token_for_all the
Recommender RPCs need the token too. Tokens are never logged or echoed.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

from recserve import contract
from recserve.config import ServerConfig

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


def bearer(metadata: Iterable[tuple[str, Any]]) -> str:
    """The bearer token of a call's metadata ("" when none)."""
    given = ""
    for key, value in metadata or ():
        if key == contract.AUTHORIZATION and isinstance(value, str):
            given = value.removeprefix("Bearer ").strip()
    return given


def token_error(cfg: ServerConfig, metadata: Iterable[tuple[str, Any]]) -> tuple[str, str] | None:
    """(reason, message) refusing the call's token, or None when it matches admin_token."""
    given = bearer(metadata)
    if hmac.compare_digest(given.encode(), cfg.admin_token.encode()):
        return None
    if not given:
        return "TOKEN_MISSING", "authorization: no bearer token; this server requires one"
    return "TOKEN_INVALID", "authorization: wrong bearer token"


def is_loopback_peer(peer: str) -> bool:
    """True for a peer on this machine: 127.0.0.0/8, ::1 (also IPv4-mapped), a unix socket."""
    kind, _, rest = unquote(peer or "").partition(":")
    if kind in ("unix", "unix-abstract"):
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def is_loopback_host(host: str) -> bool:
    """True when a bind address serves only this machine."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def admin_error(
    cfg: ServerConfig, metadata: Iterable[tuple[str, Any]], peer: str
) -> tuple[str, str, str] | None:
    """(status name, reason, message) refusing an Admin call, or None when it may proceed."""
    if cfg.admin_token:
        denied = token_error(cfg, metadata)
        return None if denied is None else ("UNAUTHENTICATED", *denied)
    if is_loopback_peer(peer):
        return None
    return (
        "PERMISSION_DENIED",
        "ADMIN_NOT_ALLOWED",
        "authorization: Admin answers only loopback peers while no admin_token is set; "
        "set admin_token (RECSERVE_ADMIN_TOKEN) to call it from other hosts",
    )
