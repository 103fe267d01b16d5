"""
### daert_ingest: documents → chunks in a retrieval collection

Reads the documents of a source (a local folder or glob, http(s) URLs, or any fsspec URL such
as `s3://bucket/prefix`), parses them (text, Markdown, HTML, PDF, DOCX), splits them into
chunks counted in the embedding model's own tokens, embeds them through the embedding service
and writes them through the retrieval service, one atomic ReplaceDocument per document.

Incremental: a document whose content and settings are unchanged is neither parsed nor
embedded again; `sync` mode also deletes (in `prepare`) the documents gone from the source.
Each mapped
`ingest_batch` task is one batch of the documents with work to do (prepare() fetched and
hashed them all), labelled with their names; a bad document is reported in the summary and
never fails the others. The last task's result is the summary,
and the collection's asset (`daert://<tenant>/<collection>`) is updated for DAGs scheduled on
fresh data.

The work lives in `daert.ingest.pipeline` (unit-tested); this file only wires it.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Asset, AssetAlias, Param, dag, get_current_context, task
from daert.ingest.params import param_specs

# The tasks import daert.ingest.pipeline (parsers, tokenizers, gRPC) when they run: the
# dag-processor imports this file every 30 s, and its top level should stay light.

# Every run adds the asset of the collection it wrote to this alias.
INGESTED = AssetAlias("daert-ingested")

# Defaults of the trigger form, and of scheduled runs: `daert up` points DAERT_INGEST_SOURCE
# at its documents folder; a cluster sets them in the Airflow environment.
_DEFAULTS = {
    "source": os.environ.get("DAERT_INGEST_SOURCE"),
    "collection": os.environ.get("DAERT_INGEST_COLLECTION", "documents"),
}

# Service trouble (UNAVAILABLE, RESOURCE_EXHAUSTED) fails a task; Airflow retries it with
# backoff, and because every write is per document and idempotent, a retry converges.
_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay": timedelta(seconds=5),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=2),
}

# What an asset event tells DAGs scheduled on the collection.
_ASSET_COUNTS = ("seen", "new", "changed", "unchanged", "deleted", "failed", "chunks_written")


def _params() -> dict[str, Param]:
    params = {}
    for name, spec in param_specs().items():
        default = _DEFAULTS.get(name)
        if default is not None:
            spec = {**spec, "default": default}
        params[name] = Param(**spec)
    return params


@dag(
    dag_id="daert_ingest",
    description="Documents from a folder, URLs or object storage into a retrieval collection",
    doc_md=__doc__,
    schedule=os.environ.get("DAERT_INGEST_SCHEDULE") or None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=_params(),
    tags=["daert", "ingestion"],
    default_args=_RETRIES,
)
def daert_ingest() -> None:
    @task
    def prepare() -> list[dict[str, Any]]:
        """Validate the params, make sure the collection exists, delete what left the source
        (sync mode), and find the documents with work to do: the batches to map over (none
        when nothing changed)."""
        from daert.ingest import pipeline

        context = get_current_context()
        plan = pipeline.prepare(context["params"])
        # Only a task's return value can be mapped over; the rest goes under its own keys.
        context["ti"].xcom_push(key="report", value=plan["report"])
        context["ti"].xcom_push(key="removal", value=plan["removal"])
        return plan["batches"]

    @task(map_index_template="{{ batch_label }}")
    def ingest_batch(batch: dict[str, Any]) -> dict[str, Any]:
        from daert.ingest import pipeline

        context = get_current_context()
        context["batch_label"] = batch["label"]  # type: ignore[typeddict-unknown-key]
        return pipeline.ingest_batch(context["params"], batch)

    # none_failed: also when no batch was mapped (nothing changed), never after a failure.
    @task(outlets=[INGESTED], trigger_rule="none_failed")
    def summarize(reports: list[dict[str, Any]]) -> dict[str, Any]:
        """The run's summary (its result, timed from the run's start), and the collection's
        asset event."""
        from daert.ingest import pipeline

        context = get_current_context()
        params = context["params"]
        checked = context["ti"].xcom_pull(task_ids="prepare", key="report")
        removal = context["ti"].xcom_pull(task_ids="prepare", key="removal")
        started = context["dag_run"].start_date
        summary = pipeline.summarize(params, [checked, *(reports or [])], removal, started)
        uri = f"daert://{params.get('tenant') or 'default'}/{params['collection']}"
        counts = {k: summary[k] for k in _ASSET_COUNTS}
        context["outlet_events"][INGESTED].add(Asset(uri), extra=counts)
        return summary

    summarize(ingest_batch.expand(batch=prepare()))


daert_ingest()
