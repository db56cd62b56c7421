# syntax=docker/dockerfile:1
#
# vellum-sidecar: one image for the sidecar and the built-in Vellum emulator.
#   docker build -t vellum-sidecar .
#   docker run --read-only -e VELLUM_TENANT_ID=... -e VELLUM_API_KEY_FILE=... vellum-sidecar
#
# Two stages, following uv's Docker guide: the build stage resolves nothing (it
# installs exactly uv.lock) and the runtime stage gets only the virtual
# environment, with no uv, compiler or source tree.

ARG PYTHON_VERSION=3.11
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---------------------------------------------------------------------------- build
FROM python:${PYTHON_VERSION}-slim-bookworm AS build

COPY --from=uv /uv /uvx /bin/

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /src

# Dependencies first, from the lock alone, so source edits reuse this layer.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=/src/uv.lock \
    --mount=type=bind,source=pyproject.toml,target=/src/pyproject.toml \
    uv sync --locked --no-dev --no-install-project --extra fast --extra otel

COPY pyproject.toml uv.lock README.md ./
COPY sidecar ./sidecar

# The project itself as a wheel (not editable): /src is not needed at run time.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-editable --extra fast --extra otel

# -------------------------------------------------------------------------- runtime
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="vellum-sidecar" \
      org.opencontainers.image.description="A localhost entitlement sidecar for the Vellum API" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 vellum \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin vellum

# The one directory the sidecar writes (SIDECAR_SNAPSHOT_FILE), owned by it: a
# volume mounted here (compose's named volume, Kubernetes' emptyDir) is what
# holds it under the read-only root filesystem; Docker seeds a new named volume
# from this directory, ownership included.
RUN mkdir -p /var/lib/vellum-sidecar \
 && chown 10001:10001 /var/lib/vellum-sidecar \
 && chmod 0700 /var/lib/vellum-sidecar

# Owned by root and not writable by the runtime user: the code cannot be changed
# from inside, and nothing needs to write (bytecode is compiled at build time),
# so the container runs with a read-only root filesystem.
COPY --from=build /app/.venv /app/.venv

ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001
WORKDIR /app

# local API (loopback inside the pod), push webhooks, health and metrics
EXPOSE 8700 8701 9700

# Exits 0 when /healthz on SIDECAR_OPS_LISTEN's port answers 200; no curl needed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["vellum-sidecar", "healthcheck"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["vellum-sidecar"]
CMD ["serve"]
