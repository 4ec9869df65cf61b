"""The service: a transport-free request core under thin gRPC transports.

`core` holds each RPC's semantics; `grpc_aio` (default) and `grpc_threads`
adapt gRPC calls to it; `app` runs one of them with health and drain;
`convert` maps protobuf to the serving path's plain values; `auth` decides
who may call.
"""

from recserve.service.app import App, health_name
from recserve.service.grpc_common import OVERALL

__all__ = ["OVERALL", "App", "health_name"]
