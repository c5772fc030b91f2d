"""The extractor registry: one class per source `kind` (`sql`, `http`, `files`), keyed by the YAML's kind.

An extractor reads one stream of one source for one run. The extract task only does:

    extractor = extractor_for(cfg, stream)          # opens its connections (Airflow connections)
    try:
        extractor.bind(crm_cur)
        stage_records(..., extractor.records(window), extra_rejects=extractor.rejects)
        extractor.stage(crm_cur, run_id)           # its own bookkeeping, in the extract transaction
    finally:
        extractor.close()

and after the load has committed, the reconcile task calls `finish(crm_conn, run_id)` of the
source's kind (e.g. the files extractor moves processed files to `archive/`).

Guarantees every extractor keeps: records are plain dicts (JSON-like values); nothing is written
to the CRM outside `stage()`; a record the extractor itself cannot read becomes a
`quarantine.Reject` in `rejects` (naming the record and the field), never an exception that stops
the stream; billed calls are counted in `calls` even when reading fails.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Iterator

if TYPE_CHECKING:
    from crm_sync.config import SourceConfig, StreamConfig
    from crm_sync.quarantine import Reject
    from crm_sync.watermark import Window

REGISTRY: dict[str, type["Extractor"]] = {}


class Extractor(ABC):
    kind: ClassVar[str]

    def __init__(self, cfg: "SourceConfig", stream: "StreamConfig") -> None:
        self.cfg = cfg
        self.stream = stream
        self.rejects: list["Reject"] = []
        self.calls = 0                     # billed API calls made (http)
        self.by_status: dict[str, int] = {}
        # what the source itself says the window holds, when it can say (a count query, an API total)
        self.source_total: int | None = None
        self.source_checksum: int | None = None  # sum of keys.key_hash over the window's keys
        self.partial = False               # stopped early on purpose (call budget): resumes next run

    # resumable extractors (paged APIs) override these three; the extract then commits page by page
    resumable: ClassVar[bool] = False

    def checkpoint(self) -> dict | None:
        """State that resumes reading after the last batch `records()` yielded."""
        return None

    def resume(self, state: dict) -> None:
        """Continue from a `checkpoint()` state instead of the window's first request."""
        raise NotImplementedError(f"{type(self).__name__} cannot resume")

    def snapshot_keys(self) -> Iterator[list[str]] | None:
        """Every key the source holds, for a full snapshot (deletes); None when the source cannot list them."""
        return None

    @property
    def notices(self) -> list[str]:
        """What on-call must hear about although the run goes on (e.g. a file rejected whole)."""
        return []

    @classmethod
    @abstractmethod
    def open(cls, cfg: "SourceConfig", stream: "StreamConfig") -> "Extractor":
        """Resolve the Airflow connection `cfg.conn_id` and return a ready extractor."""

    @abstractmethod
    def records(self, window: "Window") -> Iterator[list[dict]]:
        """Yield the stream's records in batches."""

    def bind(self, crm_cur) -> "Extractor":
        """Read access to the CRM database (a cursor) before `records()`, e.g. the files ledger."""
        return self

    def stage(self, cur, run_id: str) -> None:
        """Bookkeeping of the extractor in the extract transaction (default: none)."""

    @classmethod
    def finish(cls, crm_conn, cfg: "SourceConfig", run_id: str) -> None:
        """After the run's load committed (default: nothing to do)."""

    def close(self) -> None:
        """Release connections."""


def register(cls: type[Extractor]) -> type[Extractor]:
    REGISTRY[cls.kind] = cls
    return cls


def extractor_class(kind: str) -> type[Extractor]:
    _load_builtin()
    try:
        return REGISTRY[kind]
    except KeyError:
        raise KeyError(f"no extractor for kind {kind!r}; known: {sorted(REGISTRY)}") from None


def extractor_for(cfg: "SourceConfig", stream: "StreamConfig") -> Extractor:
    return extractor_class(cfg.kind).open(cfg, stream)


def _load_builtin() -> None:
    # importing the modules registers their classes; done lazily so a DAG file's parse imports none
    from crm_sync.sources import files_source, http_source, sql_source  # noqa: F401
