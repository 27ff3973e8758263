# syntax=docker/dockerfile:1
# Build:  docker build -t sidecar:0.1.0 .
# Run:    docker run -p 8080:8080 -p 9901:9901 -v "$PWD/sidecar.yaml:/etc/sidecar/sidecar.yaml:ro" sidecar:0.1.0
#
# Two stages: the builder turns the project and its dependencies into wheels; the final stage installs
# those wheels only (no compiler, no source tree, no pip cache) and runs as an unprivileged numeric user,
# so Kubernetes' runAsNonRoot can verify it without a runAsUser.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src

# Dependencies first, read from pyproject.toml, so this layer is rebuilt only when they change.
# Every dependency ships binary wheels for CPython 3.11 on amd64 and arm64, so no compiler is needed here.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
 && pip wheel --wheel-dir /wheels -r requirements.txt

# Then the project itself (.dockerignore keeps tests, caches, helm/ and VCS data out of the context).
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels .


FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="sidecar" \
      org.opencontainers.image.description="Reverse-proxy authentication sidecar configured by YAML route policies" \
      org.opencontainers.image.licenses="Apache-2.0"

# SIDECAR_ADMIN_HOST: the admin API (health, readiness, metrics) binds to 127.0.0.1 by default; in a
# container the kubelet's probes and Prometheus come from outside the loopback, so bind to all interfaces.
# Its management endpoints still require the admin bearer token.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SIDECAR_ADMIN_HOST=0.0.0.0

RUN groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sidecar \
 && mkdir -p /etc/sidecar

# The wheels are bind-mounted from the builder rather than copied, so they never become an image layer.
# setuptools and wheel are build tools nothing imports at run time: removed.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels sidecar \
 && pip uninstall --yes setuptools wheel \
 && sidecar --help > /dev/null

WORKDIR /tmp
USER 10001:10001
EXPOSE 8080 9901

# No curl in the slim image: python's urllib. urlopen raises on any non-2xx answer, so the exit code is 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=3)"]

ENTRYPOINT ["sidecar"]
CMD ["run", "--config", "/etc/sidecar/sidecar.yaml", "--host", "0.0.0.0", "--port", "8080", "--admin-port", "9901"]
