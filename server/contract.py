"""Names shared across the wire by the server and the clients (defined once).

Response metadata: unary calls send these as trailers, streams as initial
metadata; the response messages carry the same values in their own fields.
"""

from __future__ import annotations

MODEL = "x-recserve-model"  # the model name the request resolved to
VERSION = "x-recserve-version"  # the bundle version(s) that produced the answer
SERVED_BY = "x-recserve-served-by"  # the fallback that answered, when not the model itself
ARM = "x-recserve-arm"  # the experiment arm, for an experiment
WORKER = "x-recserve-worker"  # the id (pid) of the server process that answered

# The bearer token header of Admin calls (and of every call with token_for_all).
AUTHORIZATION = "authorization"

# Structured errors (AIP-193): every failure carries a google.rpc.Status in the
# `grpc-status-details-bin` trailer whose ErrorInfo has this domain and one of
# these reasons. A reason is stable: clients branch on it, never on the text.
ERROR_DOMAIN = "recserve.v1"
STATUS_DETAILS = "grpc-status-details-bin"
RETRY_PUSHBACK = "grpc-retry-pushback-ms"  # gRPC's retry (gRFC A6) waits this long

REASONS: dict[str, tuple[str, str]] = {  # reason -> (gRPC status name, meaning)
    "K_OUT_OF_RANGE": ("INVALID_ARGUMENT", "k is outside 1..max_k"),
    "USER_OR_HISTORY_REQUIRED": ("INVALID_ARGUMENT", "neither a user_id nor a history"),
    "HISTORY_TOO_LONG": ("INVALID_ARGUMENT", "more history events than max_history"),
    "FIELD_EMPTY": ("INVALID_ARGUMENT", "a required field is empty"),
    "ID_TOO_LONG": ("INVALID_ARGUMENT", "an id longer than its byte limit"),
    "VALUE_NOT_FINITE": ("INVALID_ARGUMENT", "a value is NaN or infinite"),
    "VALUE_OUT_OF_RANGE": ("INVALID_ARGUMENT", "a value's magnitude is above 1e30"),
    "TOO_MANY_IDS": ("INVALID_ARGUMENT", "more ids in a list than max_ids"),
    "UNKNOWN_HISTORY_ITEMS": ("INVALID_ARGUMENT", "too many history items the model lacks"),
    "INTERVAL_OUT_OF_RANGE": ("INVALID_ARGUMENT", "interval is outside (0, 1)"),
    "NOT_A_RATING_MODEL": ("INVALID_ARGUMENT", "the model ranks but does not predict ratings"),
    "INVALID_PAGE_TOKEN": ("INVALID_ARGUMENT", "a page_token this server did not issue"),
    "PAGE_SIZE_OUT_OF_RANGE": ("INVALID_ARGUMENT", "page_size is outside 0..1000"),
    "MALFORMED_REQUEST": ("INVALID_ARGUMENT", "the bytes are not the request message"),
    "UNKNOWN_MODEL": ("NOT_FOUND", "no model, hybrid or experiment by that name"),
    "UNKNOWN_ITEM": ("NOT_FOUND", "the item is unknown to the model and its fallbacks"),
    "VERSION_NOT_SERVED": ("NOT_FOUND", "the pinned version is not the one served"),
    "OVERLOADED": ("UNAVAILABLE", "the server is at capacity; retry after RetryInfo's delay"),
    "DRAINING": ("UNAVAILABLE", "the server is stopping; retry (another replica)"),
    "MODEL_NOT_LOADED": ("UNAVAILABLE", "the model and its fallbacks are still loading"),
    "FEEDBACK_UNAVAILABLE": ("UNAVAILABLE", "the feedback store cannot be reached"),
    "TOKEN_MISSING": ("UNAUTHENTICATED", "no bearer token where one is required"),
    "TOKEN_INVALID": ("UNAUTHENTICATED", "a bearer token that does not match"),
    "ADMIN_NOT_ALLOWED": ("PERMISSION_DENIED", "Admin without a token from a non-loopback peer"),
    "NO_RATING_MODEL": (
        "FAILED_PRECONDITION",
        "PredictRatings with no rating model (svd, bayes_mf) published; a retry cannot help",
    ),
    "DEADLINE_PASSED": ("DEADLINE_EXCEEDED", "the deadline passed before the answer"),
    "INTERNAL_ERROR": ("INTERNAL", "a server bug, logged with its traceback"),
}

DEFAULT_K = 10  # k 0 (omitted) in a request means this many items (AIP-158's page size)
