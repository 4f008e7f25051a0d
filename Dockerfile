# syntax=docker/dockerfile:1
# config-agent image: the sidecar (`run`, `once`), `relay` and `migrate`.
#
#   docker build -t config-agent:0.1.0 .
#   docker run --rm --read-only --tmpfs /tmp -e CONFIG_AGENT_ORG_ID=acme ... config-agent:0.1.0
#
# Runs as 65532:65532 with a read-only root filesystem: everything it writes
# goes to the volumes below (the Helm chart mounts emptyDirs there).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: install the project and its dependencies into /opt/venv --------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# .dockerignore lets through only what the build needs (pyproject.toml,
# README.md, agent/). Dependencies come from pyproject.toml's metadata; pip
# prefers wheels, so no compiler is needed here either.
COPY . .
RUN pip install --no-cache-dir .

# ---- runtime -----------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="config-agent" \
      org.opencontainers.image.description="Sidecar that keeps runtime settings in sync with PostgreSQL (Redis Pub/Sub notifications, localhost HTTP, Unix socket, shared files)." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/example/config-agent" \
      org.opencontainers.image.documentation="https://github.com/example/config-agent/blob/main/docs/kubernetes.md" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"

# The root filesystem is read-only at run time: no .pyc writes, unbuffered logs.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Socket, last-known-good state and shared output: the only writable places,
# owned by the runtime user so that fresh volumes inherit the ownership.
RUN install -d -o 65532 -g 65532 -m 0755 \
        /var/run/config-agent /var/lib/config-agent /etc/config-agent

COPY --from=builder /opt/venv /opt/venv

USER 65532:65532
WORKDIR /var/lib/config-agent
VOLUME ["/var/run/config-agent", "/var/lib/config-agent", "/etc/config-agent"]

# Metrics, /healthz and /readyz. The local API (8790) binds 127.0.0.1 on purpose.
EXPOSE 9790

# No HEALTHCHECK: Kubernetes ignores it; the chart probes /healthz and /readyz.
ENTRYPOINT ["config-agent"]
CMD ["run"]
