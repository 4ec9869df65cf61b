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
