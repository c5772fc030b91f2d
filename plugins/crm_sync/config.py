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

FieldType = Literal["text", "int", "numeric", "money", "date", "timestamptz", "bool", "phone", "json"]
Entity = Literal["customer", "order", "ticket", "interaction", "invoice", "payment", "contract"]


class ConfigError(ValueError):
    """A source YAML is missing, unreadable or invalid; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Pick(_Strict):
    """Take the value from one of several fields, chosen by another field's value (e.g. the
    customer's number is the caller of an inbound call and the callee of an outbound one)."""

    field: str = Field(min_length=1)
    cases: dict[str, str] = Field(min_length=1)


class FieldMap(_Strict):
    from_: str | list[str] | None = Field(default=None, alias="from", min_length=1)  # a list: first non-empty
    pick: Pick | None = None          # instead of `from`: the source field depends on another field
    value: str | None = None          # instead of `from`: a constant (e.g. channel: phone)
    type: FieldType = "text"
    required: bool = False
    values: dict[str, str] | None = None  # value map applied before the cast (e.g. status codes)
    scale: int | None = Field(default=None, ge=0, le=6)  # numeric/money: reject values with more decimals
    decimal_comma: bool = False       # money: '1.234,50' (comma decimal, dot grouping)
    max_length: int | None = Field(default=None, ge=1)  # text: longer values are quarantined

    @model_validator(mode="after")
    def _one_origin(self) -> "FieldMap":
        given = [k for k, v in (("from", self.from_), ("pick", self.pick), ("value", self.value)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"a field map needs exactly one of 'from', 'pick', 'value' (got {given or 'none'})")
        return self

    @property
    def source_fields(self) -> set[str]:
        """Payload fields this map reads (the schema contract checks they exist)."""
        if self.from_:
            return {self.from_} if isinstance(self.from_, str) else set(self.from_)
        if self.pick:
            return {self.pick.field, *self.pick.cases.values()}
        return set()

    @property
    def label(self) -> str:
        """How a reason names the source of the value."""
        if self.from_:
            return self.from_ if isinstance(self.from_, str) else "/".join(self.from_)
        if self.pick:
            return "/".join(sorted(set(self.pick.cases.values())))
        return "(constant)"


class IdentityKeys(_Strict):
    """Which payload fields carry identity evidence for the resolve stage."""

    name: str | None = None
    phones: list[str] = Field(default_factory=list)
    email: str | None = None
    company: str | None = None
    city: str | None = None


class CustomerRef(_Strict):
    """How a fact's `source_customer_id` finds its customer.

    `source_id`: the id of a customer record of `source` (default: this source);
    `phone`: any customer record whose normalised phone (E.164) is this value.
    """

    by: Literal["source_id", "phone"] = "source_id"
    source: str | None = None


class HeaderColumn(_Strict):
    """A spreadsheet column: the header spellings that mean it (matched after trimming, case-insensitive)."""

    headers: list[str] = Field(min_length=1)
    required: bool = False


class FileStream(_Strict):
    """Files of a landing folder read as one stream (`kind: files`)."""

    patterns: list[str] = Field(default_factory=lambda: ["*.csv", "*.xlsx"])
    columns: dict[str, HeaderColumn] = Field(min_length=1)   # canonical field -> header variants
    key_fields: list[str] = Field(min_length=1)              # canonical fields whose values make the record key
    sheet: str | int = 0                                     # xlsx: sheet name or index
    max_header_row: int = Field(default=10, ge=1, le=100)    # the header is searched in the first N rows


class Tombstone(_Strict):
    """An incremental stream's delete marker: a record whose `field` holds one of `values` (compared
    as lower-case text) soft-deletes its key instead of loading."""

    field: str = Field(min_length=1)
    values: list[str] = Field(default_factory=lambda: ["true", "1", "yes", "deleted"])


class DriftRule(_Strict):
    """A bound on one drift metric against its baseline: the median and MAD of the metric over the
    stream's last `window` successful runs of the same run type (hourly or nightly).

    The value breaches when it is beyond any bound the rule gives — `max_z`: robust z
    |x - median| / (1.4826 * MAD) above it; `max_ratio`: x at least this many times the median;
    `critical_drop` (full refreshes only): x this share or more below the median — and it differs
    from the median by more than `min_delta` and `min_rel_delta * |median|` (a series that never
    moved does not alert on a tiny change). A breach warns; it blocks the batch when `critical`,
    and a `critical_drop` breach always blocks."""

    enabled: bool = True
    max_z: float | None = Field(default=None, gt=0)
    max_ratio: float | None = Field(default=None, gt=1)
    critical_drop: float | None = Field(default=None, gt=0, le=1)
    min_delta: float = Field(default=0, ge=0)
    min_rel_delta: float = Field(default=0, ge=0)
    critical: bool = False


# Each metric's bounds unless the source YAML's `drift:` says otherwise (a metric given there keeps
# the defaults of the keys it does not name). Rates are shares (0.02 = 2 percentage points).
DRIFT_DEFAULTS: dict[str, dict] = {
    "rows": {"max_z": 4, "critical_drop": 0.8, "min_rel_delta": 0.05},
    "null_rate": {"max_z": 4, "min_delta": 0.02},
    "distinct": {"max_z": 4, "min_rel_delta": 0.05},
    "amount_sum": {"max_z": 4, "min_rel_delta": 0.05},
    "merge_rate": {"max_ratio": 3, "critical": True, "min_delta": 0.05},
    "review_rate": {"max_ratio": 3, "min_delta": 0.02},
    "new_rate": {"max_z": 4, "min_delta": 0.05},
    "rejection_rate": {"max_z": 4, "min_delta": 0.01},
    "duration_s": {"max_z": 4, "min_delta": 60, "min_rel_delta": 0.5},
}


class DriftConfig(_Strict):
    """`drift:` of a source (and, refining it, of a stream): how far a run's figures may stray from
    their baseline. Fewer than `min_history` successful runs of a run type: no verdict yet."""

    window: int = Field(default=14, ge=3, le=1000)
    min_history: int = Field(default=5, ge=2)
    rows: DriftRule = DriftRule(**DRIFT_DEFAULTS["rows"])
    null_rate: DriftRule = DriftRule(**DRIFT_DEFAULTS["null_rate"])
    distinct: DriftRule = DriftRule(**DRIFT_DEFAULTS["distinct"])
    amount_sum: DriftRule = DriftRule(**DRIFT_DEFAULTS["amount_sum"])
    merge_rate: DriftRule = DriftRule(**DRIFT_DEFAULTS["merge_rate"])
    review_rate: DriftRule = DriftRule(**DRIFT_DEFAULTS["review_rate"])
    new_rate: DriftRule = DriftRule(**DRIFT_DEFAULTS["new_rate"])
    rejection_rate: DriftRule = DriftRule(**DRIFT_DEFAULTS["rejection_rate"])
    duration_s: DriftRule = DriftRule(**DRIFT_DEFAULTS["duration_s"])

    @model_validator(mode="before")
    @classmethod
    def _over_defaults(cls, data):
        if isinstance(data, dict):
            data = {k: ({**DRIFT_DEFAULTS[k], **v} if k in DRIFT_DEFAULTS and isinstance(v, dict) else v)
                    for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _check(self) -> "DriftConfig":
        if self.min_history > self.window:
            raise ValueError(f"min_history ({self.min_history}) cannot exceed window ({self.window})")
        if self.duration_s.critical or self.duration_s.critical_drop is not None:
            raise ValueError("duration_s is known only after the load: it can warn, not block "
                             "(no critical, no critical_drop)")
        return self

    def rule(self, metric: str) -> DriftRule:
        return getattr(self, metric)


def _merge_drift(base: dict, own: dict) -> dict:
    """A stream's `drift:` over its source's: per metric, the keys the stream names win."""
    merged = dict(base)
    for key, value in own.items():
        merged[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


class StreamConfig(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    entity: Entity
    primary_key: str
    cursor_field: str
    query: str | None = None       # sql sources: uses %(since)s and %(until)s
    endpoint: str | None = None    # http sources: path under the connection's base URL
    params: dict[str, str] = Field(default_factory=dict)  # http: fixed query parameters (e.g. status: closed)
    files: FileStream | None = None  # files sources: which files and how their columns map
    customer_ref: CustomerRef = Field(default_factory=CustomerRef)
    mapping: dict[str, FieldMap]
    identity: IdentityKeys | None = None
    expectation_suite: str
    # row-level isolation: the share of the batch's rows that may be quarantined by critical row
    # expectations (those without their own `mostly`) before the whole batch is blocked
    max_bad_share: float = Field(default=0.05, ge=0, le=1)
    tombstone: Tombstone | None = None  # incremental streams: records that delete their key
    drift: DriftConfig = Field(default_factory=DriftConfig)  # the source's `drift:`, refined

    @model_validator(mode="after")
    def _check(self) -> "StreamConfig":
        from crm_sync import entities

        spec = entities.get(self.entity)
        allowed = set(spec.mappable)
        unknown = sorted(set(self.mapping) - allowed)
        if unknown:
            raise ValueError(f"mapping has unknown {self.entity} fields {unknown}; allowed: {sorted(allowed)}")
        if self.entity == "customer" and self.identity is None:
            raise ValueError("a customer stream needs identity keys (identity: name/phones/email)")
        if self.entity != "customer" and "source_customer_id" not in self.mapping:
            raise ValueError(f"an {self.entity} stream must map source_customer_id (how its customer is found)")
        for name, scale in spec.money.items():
            fm = self.mapping.get(name)
            if fm is not None and fm.type not in ("numeric", "money"):
                raise ValueError(f"{self.entity}.{name} is money: map it with type money or numeric, not {fm.type}")
            if fm is not None and fm.scale is not None and fm.scale > scale:
                raise ValueError(f"{self.entity}.{name} is stored with scale {scale}; the map declares {fm.scale}")
        return self


class HttpAuth(_Strict):
    """bearer: `Authorization: Bearer <password>`; api_key: `<header>: <password>`;
    basic: HTTP Basic with the connection's login and password."""

    type: Literal["bearer", "api_key", "basic", "none"] = "bearer"
    header: str = "X-Api-Key"


class Paginator(_Strict):
    """How the next page is asked for (dlt's rest_api paginators, as data).

    cursor: the body's `next_cursor_path` value goes into `cursor_param`; none ends the stream.
    page_number: `page_param` counts from `start`; an empty page (or past `total_pages_path`) ends it.
    offset: `offset_param` advances by the records received; fewer than a page (or past `total_path`) ends it.
    link_header: follow the RFC 8288 `Link: <url>; rel="next"` header until there is none.
    """

    type: Literal["cursor", "page_number", "offset", "link_header"] = "cursor"
    cursor_param: str = "cursor"
    next_cursor_path: str = "next_cursor"
    page_param: str = "page"
    start: int = 1
    total_pages_path: str | None = None
    offset_param: str = "offset"
    total_path: str | None = None


class HttpParams(_Strict):
    """Names of the query parameters the API uses for the window and the page size (None: not sent)."""

    since: str | None = "updated_since"
    until: str | None = "updated_before"
    page_size: str | None = "limit"


class HttpOptions(_Strict):
    auth: HttpAuth = Field(default_factory=HttpAuth)
    paginator: Paginator = Field(default_factory=Paginator)
    records_path: str = "data"      # dotted path of the record list in the body; "" = the body is the list
    params: HttpParams = Field(default_factory=HttpParams)
    page_size: int = Field(default=100, ge=1, le=1000)
    timeout_seconds: float = Field(default=10, gt=0)
    max_attempts: int = Field(default=6, ge=1, le=20)
    backoff_seconds: float = Field(default=1.0, ge=0)
    max_retry_after_seconds: float = Field(default=60, ge=0)
    # paid APIs: at most this many calls per stream and run; when spent, the run loads what it read
    # and ends "partial": the next run resumes paging where this one stopped (None: no budget)
    max_calls_per_run: int | None = Field(default=None, ge=1)
    total_path: str | None = None   # dotted path of the window's record count in the first page's body


class Sweep(_Strict):
    """Late rows: runs whose data interval ends on `schedule` (cron, in the source's timezone) read
    `horizon_hours` back instead of the lookback, so rows committed late are still caught."""

    schedule: str = "0 3 * * *"
    horizon_hours: int = Field(default=168, ge=1)


class Alerts(_Strict):
    to: list[str] = Field(default_factory=lambda: ["oncall@localhost"])
    smtp_conn_id: str = "smtp_alerts"
    # a Slack-compatible webhook (JSON {"text": ...} POSTed through this Airflow HTTP connection;
    # the path goes in the connection's `endpoint` extra). None: e-mail only.
    webhook_conn_id: str | None = None
    # a run not finished this many minutes after it was queued alerts (Airflow DeadlineAlert); None: none
    deadline_minutes: int | None = Field(default=None, ge=1)


class SourceConfig(_Strict):
    source: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = ""
    kind: Literal["sql", "http", "files"]
    conn_id: str
    crm_conn_id: str = "crm_db"
    schedule: str
    timezone: str = "UTC"
    sync_mode: Literal["full", "incremental"]
    lookback_minutes: int = Field(default=10, ge=0)
    max_volume_drop: float = Field(default=0.5, gt=0, le=1)  # full refresh: block a batch this much smaller
    max_delete_share: float = Field(default=0.1, ge=0, le=1)  # full snapshot: stop before load if more would disappear
    future_skew_minutes: int = Field(default=5, ge=0)  # a cursor this far past the source's clock is "in the future"
    sweep: Sweep | None = None       # incremental sources: the nightly late-row sweep
    task_timeout_minutes: int = Field(default=60, ge=1)       # Airflow execution_timeout of every task
    statement_timeout_seconds: int = Field(default=900, ge=1)  # PostgreSQL statement_timeout of every session
    # a quarantined key nobody fixed or released within this many days expires (one final notice);
    # None: $CRM_SYNC_QUARANTINE_EXPIRY_DAYS, else 30
    quarantine_expiry_days: int | None = Field(default=None, ge=1)
    quarantine_purge_days: int = Field(default=90, ge=1)      # settled quarantine rows are deleted after this
    priority: int = Field(default=50, ge=0, le=100)  # survivorship: higher wins for golden fields
    orphans: Literal["hold", "stub"] = "hold"  # a fact whose customer is unknown: held and retried, or a stub customer
    pool: str | None = None
    pool_slots: int = Field(default=1, ge=1)
    retries: int = Field(default=3, ge=2)
    retry_delay_seconds: int = Field(default=60, ge=1)
    http: HttpOptions = Field(default_factory=HttpOptions)
    alerts: Alerts = Field(default_factory=Alerts)
    tags: list[str] = Field(default_factory=list)
    drift: DriftConfig = Field(default_factory=DriftConfig)  # drift bounds (quality/drift.py)
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

    @model_validator(mode="before")
    @classmethod
    def _streams_inherit_drift(cls, data):
        """Each stream's `drift:` starts from the source's (its own keys refine it)."""
        if not isinstance(data, dict) or not isinstance(data.get("drift"), dict) \
                or not isinstance(data.get("streams"), list):
            return data
        streams = [{**s, "drift": _merge_drift(data["drift"], s.get("drift") or {})}
                   if isinstance(s, dict) and isinstance(s.get("drift") or {}, dict) else s
                   for s in data["streams"]]
        return {**data, "streams": streams}

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
            if self.kind == "files" and stream.files is None:
                raise ValueError(f"stream {stream.name!r}: a files source needs a 'files' section")
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
