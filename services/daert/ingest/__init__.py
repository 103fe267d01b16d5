"""Document ingestion, run by the ingestion DAG (dags/ingest_documents.py): list a source,
read each document (text, Markdown, HTML, PDF, DOCX), cut it into token-aware chunks, embed
them with the embedding service and write them with the retrieval service, incrementally
and idempotently. The DAG's tasks call `daert.ingest.pipeline`; the trigger form is built
from `daert.ingest.params.param_specs()`.
"""
