"""The parameters of one ingestion run (the DAG's trigger form), validated with pydantic."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator

from daert.ingest.errors import InvalidParams

Mode = Literal["incremental", "full", "sync"]

# Keys ingestion writes on every chunk. A user key with one of these names is rejected
# rather than silently dropped or allowed to break diffing and "sync" deletes.
RESERVED_METADATA_KEYS = frozenset(
    {
        "source_uri",
        "title",
        "headings",
        "page",
        "content_hash",
        "ingest_fingerprint",
        "ingest_source",
        "ingested_at",
        "position",
    }
)


class IngestParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str | list[str] = Field(
        description="Where the documents are: a local folder or glob (/data/docs, "
        "/data/**/*.md), http(s) URLs, or any fsspec URL (file:///x, s3://bucket/prefix, "
        "memory://x); a list mixes them.",
    )
    collection: str = Field(
        pattern=r"^[a-z][a-z0-9_]{0,62}$",
        description="Retrieval collection to write to (created when missing): 1 to 63 "
        "characters of a-z, 0-9 and _, starting with a letter.",
    )
    tenant: str = Field("", description="Tenant that owns the collection; empty is the default.")
    embedding_model: str = Field(
        "", description="Embedding model name; empty uses the embedding service's default."
    )
    dimensions: int = Field(
        0, ge=0, description="Matryoshka truncation of the vectors; 0 keeps the model's full size."
    )
    chunk_tokens: int = Field(
        200,
        ge=8,
        description="Most tokens per chunk (never more than the model reads, counting its "
        "special tokens).",
    )
    chunk_overlap_tokens: int = Field(
        32, ge=0, description="Tokens neighbouring chunks may share; less than chunk_tokens."
    )
    metadata: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="Extra metadata added to every chunk; keys must not be ones ingestion sets "
        f"({', '.join(sorted(RESERVED_METADATA_KEYS))}).",
    )
    mode: Mode = Field(
        "incremental",
        description="incremental: only new and changed documents; full: re-index everything; "
        "sync: incremental, and delete the documents gone from the source.",
    )
    # Each task is a fresh process that imports Airflow and this package (seconds of CPU):
    # a batch must carry enough work to pay for it.
    batch_size: int = Field(50, ge=1, le=1000, description="Documents per ingestion task.")

    @field_validator("source")
    @classmethod
    def _source_given(cls, value: str | list[str]) -> str | list[str]:
        entries = [value] if isinstance(value, str) else value
        if not entries:
            raise ValueError("at least one source is needed")
        if any(not entry.strip() for entry in entries):
            raise ValueError("a source must not be blank")
        return value

    @field_validator("chunk_overlap_tokens")
    @classmethod
    def _overlap_below_size(cls, value: int, info: Any) -> int:
        size = info.data.get("chunk_tokens")
        if size is not None and value >= size:
            raise ValueError(f"must be less than chunk_tokens ({size})")
        return value

    @field_validator("metadata")
    @classmethod
    def _no_reserved_keys(cls, value: dict[str, JsonValue]) -> dict[str, JsonValue]:
        taken = sorted(RESERVED_METADATA_KEYS.intersection(value))
        if taken:
            raise ValueError(f"key {taken[0]!r} is set by ingestion itself; use another name")
        return value

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)


def parse_params(raw: IngestParams | Mapping[str, Any]) -> IngestParams:
    """`raw` validated (the DAG passes its params dict), or InvalidParams whose message names
    every offending field, e.g. ``chunk_overlap_tokens: must be less than chunk_tokens``."""
    if isinstance(raw, IngestParams):
        return raw
    try:
        return IngestParams.model_validate(dict(raw))
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            # Drop pydantic's union-branch names ("source.str"), keep real paths ("source.1").
            path = [str(p) for p in error["loc"] if p not in ("str", "list[str]")]
            problems.append(f"{'.'.join(path) or 'params'}: {error['msg']}")
        raise invalid_params(*problems) from None


def invalid_params(*problems: str) -> InvalidParams:
    """InvalidParams listing `problems`, each "field: what is wrong"."""
    return InvalidParams("invalid ingestion params:\n  " + "\n  ".join(problems))


def param_specs() -> dict[str, dict[str, Any]]:
    """JSON-schema keywords per field, for the DAG's trigger form: ``Param(**spec)`` for each
    (default, type, description, title and enum / minimum / maximum / pattern / items where
    the field has them). A required field has no "default"."""
    schema = IngestParams.model_json_schema()
    specs: dict[str, dict[str, Any]] = {}
    for name, prop in schema["properties"].items():
        spec = {k: v for k, v in prop.items() if k != "anyOf"}
        for branch in prop.get("anyOf", ()):  # str | list[str] -> type ["string", "array"]
            spec["type"] = [*spec.get("type", []), branch["type"]]
            spec.update({k: v for k, v in branch.items() if k == "items"})
        if name == "metadata":
            # A default factory is not in the schema, and its value schema refers to $defs
            # that a form field does not carry: any JSON object.
            spec["default"] = {}
            spec.pop("additionalProperties", None)
        specs[name] = spec
    return specs
