# syntax=docker/dockerfile:1
#
# probe: the health-probe sidecar for Triton. Two stages: the builder turns the source into a wheel and
# installs it with its dependencies into /opt/venv; the final stage copies only that venv onto a clean
# slim base, so no pip cache, source tree or build tooling ships. Build from the repository root:
#
#   docker build -t registry.example.com/probe:0.1.0 .
#
# The base is pinned to an exact patch tag; bump it deliberately (both FROM lines together, they must match
# because the venv's interpreter symlinks point at the base's /usr/local/bin/python3). For a fully immutable
# build also pin the index digest, e.g. python:3.11.14-slim-bookworm@sha256:<digest> as printed by
# `docker buildx imagetools inspect python:3.11.14-slim-bookworm`.

FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Every runtime dependency (aiohttp, numpy, xxhash, tritonclient, nvidia-ml-py, ...) ships manylinux wheels
# for amd64 and arm64, so the builder needs no compiler either.
COPY pyproject.toml README.md ./
COPY probe ./probe

RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-cache-dir /wheels/probe-*.whl \
 && /opt/venv/bin/probe --version


FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="probe" \
      org.opencontainers.image.description="Kubernetes health-probe sidecar that checks Triton's models, not just its process" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid so `runAsNonRoot` can be verified by the kubelet without reading /etc/passwd,
# and so securityContext.runAsUser in the manifests can name it.
RUN groupadd --system --gid 10001 probe \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin probe

COPY --from=builder /opt/venv /opt/venv
# A default config so `docker run IMAGE` starts; in Kubernetes a ConfigMap is mounted over /etc/probe.
COPY configs/probe.yaml /etc/probe/probe.yaml

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
WORKDIR /etc/probe

# listen.port in probe.yaml: /ready, /live, /ready/<check>, /metrics.
EXPOSE 8080

# Docker (not Kubernetes, which ignores HEALTHCHECK) restarts nothing on this; it only marks the container.
# /live/ping tests the sidecar itself, never Triton, so a sick Triton does not make the probe look unhealthy.
HEALTHCHECK --interval=10s --timeout=2s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/live/ping', timeout=1)"]

# `probe serve` handles SIGTERM itself (fails /ready, drains for probe.drain seconds, exits 0), so it can be
# PID 1 without an init shim.
ENTRYPOINT ["probe", "serve"]
CMD ["-c", "/etc/probe/probe.yaml"]
