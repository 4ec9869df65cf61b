# syntax=docker/dockerfile:1
# First version (Foundation issue): builds the wheel in a builder stage and runs
# `recserve quickstart`, which makes the default data and model bundles in the
# /var/lib/recserve volume. The serving command, gRPC ports and the gRPC health
# probe arrive with the service issue.

FROM python:3.11-slim-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY kernels ./kernels
COPY server ./server
COPY clients ./clients
# The wheel carries the compiled kernels and the generated recserve.v1 stubs.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip wheel --no-cache-dir --wheel-dir /wheels /wheels/recserve-*.whl

FROM python:3.11-slim-bookworm AS runtime
# libgomp1: the OpenMP runtime the kernels link against; nothing else compiles here.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/recserve --create-home recserve
COPY --from=builder /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels recserve \
 && rm -rf /wheels
USER recserve
WORKDIR /var/lib/recserve
VOLUME ["/var/lib/recserve"]
ENV PYTHONUNBUFFERED=1
# Healthy while every published bundle verifies (sha256 of every file).
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
  CMD ["recserve", "models", "verify", "--models", "/var/lib/recserve/models"]
CMD ["recserve", "quickstart", "--workdir", "/var/lib/recserve"]
