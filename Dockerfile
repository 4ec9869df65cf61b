# syntax=docker/dockerfile:1
# Builds the wheel (compiled kernels + generated stubs) in a builder stage; the
# runtime stage has no compiler. By default the container makes the embedded
# default data and models in the /var/lib/recserve volume (once), then serves
# them: gRPC on 50051, Prometheus on 9090. To serve your own bundles, mount them
# and run `recserve serve --models /models` (plus --config for hybrids etc.).

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
 && groupadd --system --gid 10001 recserve \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/recserve --create-home recserve
COPY --from=builder /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels recserve==0.1.0 \
 && rm -rf /wheels
USER 10001:10001
WORKDIR /var/lib/recserve
VOLUME ["/var/lib/recserve"]
# Drain within Docker's default 10 s stop timeout: in-flight streams finish first.
ENV PYTHONUNBUFFERED=1 RECSERVE_GRACE_SECONDS=8 RECSERVE_PORT=50051 RECSERVE_METRICS_PORT=9090
EXPOSE 50051 9090
# grpc.health.v1 Check of the whole server: SERVING as soon as one model is loaded.
# The start period covers the first run's quickstart training (about 10 s).
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["recserve-health", "--timeout", "2"]
STOPSIGNAL SIGTERM
CMD ["sh", "-c", "recserve quickstart --workdir /var/lib/recserve && exec recserve serve --config /var/lib/recserve/recserve.toml"]
