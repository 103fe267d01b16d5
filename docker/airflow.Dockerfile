# syntax=docker/dockerfile:1
# Airflow with the stack's DAGs baked in and the `daert` package (typed gRPC clients,
# ingestion logic) importable from them.
#
#   docker build -f docker/airflow.Dockerfile -t daert-airflow:0.1.0 .
#
# The base is pinned by tag; add the digest (apache/airflow:3.1.8-python3.11@sha256:...) when
# you build: it could not be looked up where this file was written (no network, no Docker).

ARG AIRFLOW_IMAGE=apache/airflow:3.1.8-python3.11
FROM ${AIRFLOW_IMAGE}

# Must match the base image's Airflow: pinned in the same `pip install` so that installing our
# package can never up- or downgrade Airflow itself (the official image's documented way).
ARG AIRFLOW_VERSION=3.1.8

# The official image installs as the `airflow` user (uid 50000) into its user site.
USER airflow

# Dependencies first (a layer that survives source edits), then the source; no `models` extra:
# DAG tasks call the embedding and rerank services over gRPC, they load no models.
COPY --chown=airflow:0 pyproject.toml README.md /opt/daert-src/
RUN mkdir -p /opt/daert-src/services/daert \
    && touch /opt/daert-src/services/daert/__init__.py \
    && pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" /opt/daert-src \
    && pip uninstall --yes daert
COPY --chown=airflow:0 services/ /opt/daert-src/services/
RUN pip install --no-cache-dir --no-deps "apache-airflow==${AIRFLOW_VERSION}" /opt/daert-src \
    && rm -rf /opt/daert-src/build /opt/daert-src/*.egg-info

# The DAGs (Airflow's default dags_folder).
COPY --chown=airflow:0 dags/ /opt/airflow/dags/

ENV HF_HUB_OFFLINE=1
