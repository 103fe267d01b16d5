# syntax=docker/dockerfile:1
# The sandbox service: runs LLM-written Python isolated (`daert serve sandbox`).
#
#   docker build -f docker/sandbox.Dockerfile -t daert-sandbox:0.1.0 .
#
# Debian's python3 (3.11 on bookworm) is both the service's interpreter and the one the
# sandboxed code runs on (/usr/bin/python3, DAERT_SANDBOX_PYTHON's default); bubblewrap and
# libseccomp2 come from Debian too. The packages sandboxed code may import
# (services/daert/sandbox/packages.txt) are installed into a root-owned read-only folder.
#
# Drivers: `bubblewrap` (the default) needs unprivileged user namespaces in the container;
# on Kubernetes the chart runs the `process` driver inside a gVisor RuntimeClass with a
# deny-all NetworkPolicy instead (DAERT_SANDBOX_DRIVER=process).
#
# Base images are pinned by tag; add the digest (debian:12.12-slim@sha256:...) when you build:
# it could not be looked up where this file was written (no network, no Docker engine).

ARG DEBIAN_IMAGE=debian:12.12-slim

# ---------------------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS builder

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/daert/venv \
    PATH=/opt/daert/venv/bin:$PATH

RUN /usr/bin/python3 -m venv "$VIRTUAL_ENV" \
    && pip install --upgrade pip setuptools wheel

WORKDIR /src

# The allowed packages first (they change rarely), for the same interpreter the sandbox runs.
COPY services/daert/sandbox/packages.txt /src/sandbox-packages.txt
RUN pip install --target /opt/daert/sandbox-packages -r /src/sandbox-packages.txt

# The service's dependencies (no `models` extra: no torch here), then its source.
COPY pyproject.toml README.md ./
RUN mkdir -p services/daert \
    && touch services/daert/__init__.py \
    && pip install . \
    && pip uninstall --yes daert \
    && rm -rf services build ./*.egg-info
COPY services/ ./services/
RUN pip install --no-deps . \
    && python -m compileall -q "$VIRTUAL_ENV/lib" \
    && rm -rf build ./*.egg-info

# ---------------------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS runtime

LABEL org.opencontainers.image.title="daert-sandbox" \
      org.opencontainers.image.description="daert-stack sandbox service: daert serve sandbox" \
      org.opencontainers.image.licenses="Apache-2.0"

# python3 at /usr/bin/python3 (the venv below links to it), bubblewrap, libseccomp2 (the
# seccomp filter); prlimit and setpriv come with util-linux, which every Debian image has.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 bubblewrap libseccomp2 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 daert \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/daert --create-home \
       --shell /usr/sbin/nologin daert

COPY --from=builder /opt/daert/venv /opt/daert/venv
# Root-owned and read-only: the service (uid 10001) and the sandboxes can read, never write.
COPY --from=builder /opt/daert/sandbox-packages /opt/daert/sandbox-packages
RUN chmod -R a-w /opt/daert/sandbox-packages

ENV PATH=/opt/daert/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DAERT_SANDBOX_PYTHON=/usr/bin/python3 \
    DAERT_SANDBOX_PACKAGES_DIR=/opt/daert/sandbox-packages

WORKDIR /home/daert
USER 10001:10001

# gRPC and Prometheus metrics.
EXPOSE 50055 9055

ENTRYPOINT ["daert"]
CMD ["serve", "sandbox"]
