"""Source configuration: one YAML per source system under `include/sources/`, validated once.

A source YAML declares what the pipeline does for that system — connection id, query or
endpoint, primary key, cursor and lookback, schedule, field mapping, expectation suite, match
keys — in the spirit of dlt's declarative sync modes. `load_source(name)` validates it with
pydantic and raises `ConfigError` naming the file and the field, so a broken file fails only
its own DAG's import.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from crm_sync import paths

FieldType = Literal["text", "int", "numeric", "date", "timestamptz", "bool"]
Entity = Literal["customer", "order", "ticket"]

# Target columns each entity accepts from a mapping (the CRM model).
ENTITY_FIELDS: dict[str, set[str]] = {
    "customer": {"full_name", "company", "city", "source_created_at", "source_updated_at"},
    "order": {"source_customer_id", "order_date", "amount", "currency", "status", "source_updated_at"},
    "ticket": {"source_customer_id", "subject", "status", "priority", "source_created_at", "source_updated_at"},
}


class ConfigError(ValueError):
    """A source YAML is missing, unreadable or invalid; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FieldMap(_Strict):
    from_: str = Field(alias="from", min_length=1)
    type: FieldType = "text"
    required: bool = False
    values: dict[str, str] | None = None  # value map applied before the cast (e.g. status codes)
    scale: int | None = Field(default=None, ge=0, le=6)  # numeric: reject values with more decimals


class IdentityKeys(_Strict):
    """Which payload fields carry identity evidence for the resolve stage."""

    name: str | None = None
    phones: list[str] = Field(default_factory=list)
    email: str | None = None
    company: str | None = None
    city: str | None = None


class StreamConfig(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    entity: Entity
    primary_key: str
    cursor_field: str
    query: str | None = None       # sql sources: uses %(since)s and %(until)s
    endpoint: str | None = None    # http sources: path under the connection's base URL
    mapping: dict[str, FieldMap]
    identity: IdentityKeys | None = None
    expectation_suite: str
    amount_field: str | None = None  # reconciled as an exact NUMERIC sum, source vs target

    @model_validator(mode="after")
    def _check(self) -> "StreamConfig":
        allowed = ENTITY_FIELDS[self.entity]
        unknown = sorted(set(self.mapping) - allowed)
        if unknown:
            raise ValueError(f"mapping has unknown {self.entity} fields {unknown}; allowed: {sorted(allowed)}")
        if self.entity == "customer" and self.identity is None:
            raise ValueError("a customer stream needs identity keys (identity: name/phones/email)")
        if self.entity != "customer" and "source_customer_id" not in self.mapping:
            raise ValueError(f"an {self.entity} stream must map source_customer_id")
        if self.amount_field and self.amount_field not in self.mapping:
            raise ValueError(f"amount_field {self.amount_field!r} is not a mapped field")
        return self


class HttpOptions(_Strict):
    page_size: int = Field(default=100, ge=1, le=1000)
    timeout_seconds: float = Field(default=10, gt=0)
    max_attempts: int = Field(default=6, ge=1, le=20)
    backoff_seconds: float = Field(default=1.0, ge=0)
    max_retry_after_seconds: float = Field(default=60, ge=0)


class Alerts(_Strict):
    to: list[str] = Field(default_factory=lambda: ["oncall@localhost"])
    smtp_conn_id: str = "smtp_alerts"


class SourceConfig(_Strict):
    source: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = ""
    kind: Literal["sql", "http"]
    conn_id: str
    crm_conn_id: str = "crm_db"
    schedule: str
    timezone: str = "UTC"
    sync_mode: Literal["full", "incremental"]
    lookback_minutes: int = Field(default=10, ge=0)
    max_volume_drop: float = Field(default=0.5, gt=0, le=1)  # full refresh: block a batch this much smaller
    priority: int = Field(default=50, ge=0, le=100)  # survivorship: higher wins for golden fields
    pool: str | None = None
    pool_slots: int = Field(default=1, ge=1)
    retries: int = Field(default=3, ge=2)
    retry_delay_seconds: int = Field(default=60, ge=1)
    http: HttpOptions = Field(default_factory=HttpOptions)
    alerts: Alerts = Field(default_factory=Alerts)
    tags: list[str] = Field(default_factory=list)
    streams: list[StreamConfig] = Field(min_length=1)

    @property
    def dag_id(self) -> str:
        return f"crm_sync__{self.source}"

    @property
    def lookback(self) -> timedelta:
        return timedelta(minutes=self.lookback_minutes)

    def stream(self, name: str) -> StreamConfig:
        for stream in self.streams:
            if stream.name == name:
                return stream
        raise KeyError(f"source {self.source!r} has no stream {name!r}")

    @field_validator("streams")
    @classmethod
    def _unique_streams(cls, streams: list[StreamConfig]) -> list[StreamConfig]:
        names = [s.name for s in streams]
        if len(names) != len(set(names)):
            raise ValueError(f"stream names repeat: {names}")
        return streams

    @model_validator(mode="after")
    def _check_kind(self) -> "SourceConfig":
        for stream in self.streams:
            if self.kind == "sql" and not stream.query:
                raise ValueError(f"stream {stream.name!r}: a sql source needs a query")
            if self.kind == "http" and not stream.endpoint:
                raise ValueError(f"stream {stream.name!r}: an http source needs an endpoint")
        return self


def source_path(name: str) -> Path:
    return paths.sources_dir() / f"{name}.yaml"


def _format_error(path: Path, err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"{path}: field '{loc}': {item['msg']}")
    return "invalid source config\n" + "\n".join(lines)


def load_source(name: str) -> SourceConfig:
    return load_source_file(source_path(name))


def load_source_file(path: Path) -> SourceConfig:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: source config file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        cfg = SourceConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(path, exc)) from None
    if cfg.source != path.stem:
        raise ConfigError(f"{path}: field 'source': {cfg.source!r} must match the file name {path.stem!r}")
    return cfg


def all_source_names() -> list[str]:
    return sorted(p.stem for p in paths.sources_dir().glob("*.yaml"))
