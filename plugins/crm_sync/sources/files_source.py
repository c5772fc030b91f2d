"""Customer lists that sales staff drop into a landing folder (CSV and XLSX), each content read once.

What the extractor guarantees:
- **Once per content.** A file is known by the sha256 of its bytes, recorded in `sync.file_ledger`
  per (source, stream). Content already `loaded` or `rejected` is never read again, whatever the
  file is called now; content `staged` by a run whose load never committed is read again.
- **Files move only after a commit.** `records()` and `stage()` leave new files where they are;
  `finish()` (after the load committed) marks them `loaded` and moves them to `archive/`, and
  moves rejected ones to `rejected/` next to a `<file>.reason.txt`. A file whose ledger state
  is already settled but still lies in the landing folder (a move interrupted by a crash) is
  moved by the next `records()`. Name clashes in `archive/` or `rejected/` get the checksum
  prefix appended, never overwrite.
- **A bad file never stops the others.** Undecodable bytes, a corrupted workbook or a header
  without a required column reject the whole file: one `quarantine.Reject` (source_pk = file
  name, field = the column or 'encoding') whose reason names the file, the rows searched and
  the columns expected. A row whose key columns are all empty is one `Reject`
  (source_pk = "<file>:<row>"). Both are collected in `rejects`.
- **Records say where they came from.** Every record carries each configured canonical field
  (None when empty or when the file lacks the column), unknown columns under their header text,
  and `_file`, `_sheet`, `_row` (the row number Excel shows), `_modified_at` (file mtime, UTC)
  and `_key`: a hash of the normalised key fields, the same for the same customer in any file.

Reading one file is `sheets.read_file` (encodings, headers, merged cells, numbers as text).

How the extract task drives it (the ledger is read through a cursor the caller binds, because
`records()` itself must not write and has no connection of its own):

    ex = FilesExtractor.open(cfg, stream)          # landing folder from the Airflow connection
    with conn.cursor() as cur:
        ex.bind(cur)                               # read-only ledger lookups during records()
        stage_records(conn, run_id, cfg, stream, window, ex.records(window), extra_rejects=ex.rejects)
        ex.stage(cur, run_id)                      # ledger rows: staged / rejected
    conn.commit()
    ...                                            # map, validate, load commit
    FilesExtractor.finish(crm_conn, cfg, run_id)   # loaded + archive/, rejected/ + reason file
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from crm_sync.quarantine import Reject
from crm_sync.sources.base import Extractor, register
from crm_sync.sources.sheets import FileRejected, read_file

if TYPE_CHECKING:
    from crm_sync.config import SourceConfig, StreamConfig
    from crm_sync.watermark import Window

log = logging.getLogger(__name__)

ARCHIVE = "archive"
REJECTED = "rejected"
BATCH_ROWS = 5_000
# Excel's lock files ("~$客户.xlsx") and hidden files are someone's open editor, not an upload.
IGNORED_PREFIXES = ("~$", ".")


@dataclass
class FileOutcome:
    """One landing file as this run saw it; `state` is staged, rejected, loaded (skipped),
    known-rejected (skipped) or duplicate (same bytes as another file of this run)."""

    name: str
    checksum: str
    state: str
    rows: int | None = None
    blank_rows: int = 0
    rejected_rows: int = 0
    reason: str | None = None
    encoding: str | None = None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- moving files ---------------------------------------------------------------------------------

def _free_name(folder: Path, name: str, checksum: str) -> Path:
    target = folder / name
    if not target.exists():
        return target
    stem, suffix = Path(name).stem, Path(name).suffix
    target = folder / f"{stem}.{checksum[:12]}{suffix}"
    counter = 2
    while target.exists():
        target = folder / f"{stem}.{checksum[:12]}.{counter}{suffix}"
        counter += 1
    return target


def settle_file(landing: Path, name: str, checksum: str, state: str, *, reason: str | None = None,
                run_id: str | None = None, known_checksum: bool = False) -> Path | None:
    """Move a landing file whose ledger state is final: `loaded` to archive/, `rejected` to
    rejected/ with a reason file. A file of that name with other bytes (a new upload) stays.
    Return where it went, or None when nothing moved."""
    source = landing / name
    if not source.is_file():
        return None
    if not known_checksum and sha256_file(source) != checksum:
        log.warning("%s: not moved — its content changed since it was read (a new upload); "
                    "the next run reads it", source)
        return None
    folder = landing / (ARCHIVE if state == "loaded" else REJECTED)
    folder.mkdir(parents=True, exist_ok=True)
    target = _free_name(folder, name, checksum)
    if state == "rejected":
        target.with_name(target.name + ".reason.txt").write_text(
            f"file: {name}\nsha256: {checksum}\nrejected by crm-sync run: {run_id or '?'}\n"
            f"reason: {reason or '(not recorded)'}\n\nFix the file and upload it again; "
            f"the same bytes are never read twice.\n",
            encoding="utf-8",
        )
    source.replace(target)
    log.info("moved %s to %s", source, target)
    return target


# --- the extractor --------------------------------------------------------------------------------

def landing_path(conn_id: str) -> Path:
    """The landing folder of the Airflow connection `conn_id` (conn_type fs; extra.path, else host)."""
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    extra = conn.extra_dejson or {}
    path = extra.get("path") or conn.host
    if not path:
        raise ValueError(f"Airflow connection '{conn_id}' names no landing folder: set extra "
                         '{"path": "/data/landing/..."} (or host)')
    return Path(path)


@register
class FilesExtractor(Extractor):
    """Reads the landing folder of one stream; see the module docstring for how to drive it.

    `ledger_cursor` (set with `bind(cur)` before `records()`) is a cursor on the CRM database;
    `records()` only reads `sync.file_ledger` through it. `files` lists what happened to every
    landing file this run (for logs and the task's return value).
    """

    kind = "files"

    def __init__(self, cfg: "SourceConfig", stream: "StreamConfig", landing: Path, *, ledger_cursor=None) -> None:
        super().__init__(cfg, stream)
        if stream.files is None:
            raise ValueError(f"stream {stream.name!r} has no 'files' section")
        self.landing = Path(landing)
        self.ledger_cursor = ledger_cursor
        self.files: list[FileOutcome] = []

    @classmethod
    def open(cls, cfg: "SourceConfig", stream: "StreamConfig") -> "FilesExtractor":
        landing = landing_path(cfg.conn_id)
        if not landing.is_dir():
            raise FileNotFoundError(f"source '{cfg.source}': landing folder {landing} (Airflow connection "
                                    f"'{cfg.conn_id}') does not exist or is not a folder")
        return cls(cfg, stream, landing)

    @property
    def notices(self) -> list[str]:
        return [f"file {f.name!r} was rejected and goes to rejected/ with {f.name}.reason.txt: {f.reason}. "
                "To load it: save it as XLSX or CSV (UTF-8 or GBK) with a header the source YAML names, "
                "and drop it into the landing folder again; the next run reads it."
                for f in self.files if f.state == "rejected"]

    def bind(self, cur) -> "FilesExtractor":
        self.ledger_cursor = cur
        return self

    def candidates(self) -> list[Path]:
        """Top-level files of the landing folder matching the stream's patterns (case-insensitive), by name."""
        patterns = [p.lower() for p in self.stream.files.patterns]
        return sorted(
            (p for p in self.landing.iterdir()
             if p.is_file() and not p.name.startswith(IGNORED_PREFIXES)
             and any(fnmatch.fnmatchcase(p.name.lower(), pat) for pat in patterns)),
            key=lambda p: p.name,
        )

    def _ledger(self, checksum: str) -> tuple[str, str | None, str] | None:
        if self.ledger_cursor is None:
            raise RuntimeError("FilesExtractor.records() needs the CRM ledger: call bind(cur) with a cursor "
                               "on the CRM database first (it only reads sync.file_ledger)")
        self.ledger_cursor.execute(
            "select state, reason, run_id from sync.file_ledger where source = %s and stream = %s and checksum = %s",
            (self.cfg.source, self.stream.name, checksum),
        )
        return self.ledger_cursor.fetchone()

    def records(self, window: "Window | None" = None) -> Iterator[list[dict]]:
        """Yield the records of every new file, one file at a time (the window is not used:
        the ledger decides what is new). Fills `rejects` and `files` as it goes."""
        self.files = []
        seen: set[str] = set()
        for path in self.candidates():
            checksum = sha256_file(path)
            known = self._ledger(checksum)
            if known is not None and known[0] in ("loaded", "rejected"):
                state, reason, run_id = known
                settle_file(self.landing, path.name, checksum, state, reason=reason, run_id=run_id,
                            known_checksum=True)
                self.files.append(FileOutcome(path.name, checksum, f"skipped ({state} before)", reason=reason))
                continue
            if checksum in seen:
                self.files.append(FileOutcome(path.name, checksum, "duplicate"))
                log.info("%s: same bytes as another file of this run; not read again", path.name)
                continue
            seen.add(checksum)
            try:
                read = read_file(path, self.stream)
            except FileRejected as exc:
                reason = f"{path.name}: {exc.reason}"
                log.warning("rejected %s", reason)
                self.rejects.append(Reject(self.stream.name, path.name, "extract", exc.field, reason,
                                           {"_file": path.name, "checksum": checksum}))
                self.files.append(FileOutcome(path.name, checksum, "rejected", reason=reason))
                continue
            self.rejects.extend(read.rejects)
            self.files.append(FileOutcome(path.name, checksum, "staged", rows=len(read.records),
                                          blank_rows=read.blank_rows, rejected_rows=len(read.rejects),
                                          encoding=read.encoding))
            log.info("%s: %d records, %d blank rows skipped, %d rows rejected (header row %d, %s)", path.name,
                     len(read.records), read.blank_rows, len(read.rejects), read.header_row,
                     read.encoding or f"sheet {read.sheet}")
            for start in range(0, len(read.records), BATCH_ROWS):
                yield read.records[start:start + BATCH_ROWS]

    def stage(self, cur, run_id: str) -> None:
        """Record this run's files in the ledger (in the extract transaction): read files as
        `staged` with their record counts, rejected ones as `rejected` with the reason."""
        rows = [(self.cfg.source, self.stream.name, f.checksum, f.name, run_id, f.state, f.rows, f.reason)
                for f in self.files if f.state in ("staged", "rejected")]
        if not rows:
            return
        cur.executemany(
            """
            insert into sync.file_ledger as l (source, stream, checksum, file_name, run_id, state, rows, reason)
            values (%s, %s, %s, %s, %s, %s, %s, %s)
            on conflict (source, stream, checksum) do update
                set file_name = excluded.file_name, run_id = excluded.run_id, state = excluded.state,
                    rows = excluded.rows, reason = excluded.reason, done_at = null
                where l.state = 'staged'
            """,
            rows,
        )

    @classmethod
    def finish(cls, crm_conn, cfg: "SourceConfig", run_id: str, *, landing: Path | None = None) -> None:
        """After the run's load committed: this run's `staged` files become `loaded` (commit), then
        they move to archive/ and its rejected files to rejected/. Safe to call again."""
        landing = Path(landing) if landing is not None else landing_path(cfg.conn_id)
        with crm_conn.cursor() as cur:
            cur.execute(
                """update sync.file_ledger set state = 'loaded', done_at = now()
                   where source = %s and run_id = %s and state = 'staged'""",
                (cfg.source, run_id),
            )
            cur.execute(
                """update sync.file_ledger set done_at = now()
                   where source = %s and run_id = %s and state = 'rejected' and done_at is null""",
                (cfg.source, run_id),
            )
            cur.execute(
                """select file_name, checksum, state, reason from sync.file_ledger
                   where source = %s and run_id = %s order by file_name""",
                (cfg.source, run_id),
            )
            settled = cur.fetchall()
        crm_conn.commit()
        for name, checksum, state, reason in settled:
            settle_file(landing, name, checksum, state, reason=reason, run_id=run_id)
