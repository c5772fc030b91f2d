"""Quarantine: rejected rows are kept with the stage, field and reason, never silently dropped.

A quarantine row either rejects its key for the run (`blocks_key`, the default: the key does not
load) or only records a version that was not kept (an older duplicate of a key inside one batch,
`blocks_key = false`): that one never stops the key's kept version from loading.

Guarantees (issue 10, migration 0009):
- every row has a stable rule name, `reason_code`: the expectation for validate rows, else
  `<stage>.<rule>` (`extract.null_cursor`, `map.cast`, `load.customer_not_known`, …), named by its
  writer (`Reject.reason_code`) or derived by the database from the reason's stable beginning;
- every row has `masked_value`, its field's value as it may be shown: the value of a phone, e-mail
  or name field is masked whatever its shape (`zhang.wei@` -> `z***`, `1380013800` -> `***3800`).
  A field holds a phone or an e-mail when its name says so or the source YAML does (identity
  keys, `type: phone` maps and the payload fields they read). Reasons are stored as the stage
  wrote them and masked the same way whenever this module hands them out (`mask_reason`);
- `summary` groups by source, stream, stage, rule and field, counting rows and distinct keys;
- a row's life cycle: open -> released (steward) -> resolved | retried (the next run's load);
  open -> resolved when a later run loads the key anyway (the source fixed it); open, released
  or expired -> discarded (steward); open or released -> expired (`expire`). Steward actions and
  expiries are also written to `sync.quarantine_action`, which nothing deletes. A row only ever
  blocks its key in its own run (`ACCEPTED`): releasing never forces a load.

How a release is retried (`release`, `release_window`, `settle`): the release is recorded; the
next run of the source widens its extract window back to the released keys (their cursor minus
the lookback, or the window of the run that rejected them), so the keys are read again from the
source as it is now and go through map and validate like any row; the load of that run settles
the release: `resolved` when the key loaded, `retried` when it was rejected again (that run has its
own open row). A full-refresh source reads every key each run anyway. A files source has no
window: the corrected file has to be delivered again.
"""
from __future__ import annotations

import getpass
import logging
import os
import re
from dataclasses import dataclass, field as dc_field
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from crm_sync import staging
from crm_sync.masking import field_kind, mask_field, mask_text

log = logging.getLogger(__name__)

STATUSES = ("open", "released", "resolved", "retried", "discarded", "expired")
DEFAULT_EXPIRY_DAYS = 30
EXPIRY_ENV = "CRM_SYNC_QUARANTINE_EXPIRY_DAYS"


@dataclass(frozen=True)
class Reject:
    stream: str
    source_pk: str | None
    stage: str
    field: str | None
    reason: str
    payload: dict | None = None
    expectation: str | None = None
    blocks_key: bool = True
    reason_code: str | None = None  # None: the database derives it (migration 0009)


# SQL predicate on a staging row aliased `m`: true when no stage of its run quarantined its key.
ACCEPTED = """
    not exists (select 1 from sync.quarantine q
                where q.run_id = m.run_id and q.source = m.source and q.stream = m.stream
                  and q.source_pk = m.source_pk and q.blocks_key)
"""


def where(source: str, stream: str, source_pk, field: str | None) -> str:
    """How an error text names the place of a bad value: source, stream, record key and field."""
    text = f"source '{source}' stream '{stream}' record {_key(source_pk)}"
    return text + (f" field '{field}'" if field else "")


def _key(source_pk) -> str:
    if source_pk is None:
        return "(no key)"
    text = str(source_pk)
    return repr(text if len(text) <= 80 else text[:80] + "…")


def clear(cur, run_id: str, source: str, stream: str, stage: str) -> None:
    cur.execute(
        "delete from sync.quarantine where run_id = %s and source = %s and stream = %s and stage = %s",
        (run_id, source, stream, stage),
    )


def add(cur, run_id: str, source: str, rejects: Iterable[Reject]) -> int:
    """Write `rejects` of one run; each row gets its rule and its field's masked value."""
    info = source_fields(source)

    def rows():
        for r in rejects:
            yield (run_id, source, r.stream, r.source_pk, r.stage, r.field, r.reason, r.expectation,
                   staging.to_json(r.payload) if r.payload is not None else None, r.blocks_key, r.reason_code,
                   _masked_value(info.get(r.stream), r))

    return staging.copy_rows(
        cur, "sync.quarantine",
        ["run_id", "source", "stream", "source_pk", "stage", "field", "reason", "expectation", "payload",
         "blocks_key", "reason_code", "masked_value"],
        rows(),
    )


def rejected_keys(cur, run_id: str, source: str, stream: str) -> set[str]:
    """Keys of the stream that do not load in this run (superseded-version records excluded)."""
    cur.execute(
        "select distinct source_pk from sync.quarantine where run_id = %s and source = %s and stream = %s"
        " and source_pk is not null and blocks_key",
        (run_id, source, stream),
    )
    return {row[0] for row in cur.fetchall()}


# --- which fields hold personal data, and how a row is shown -----------------------------------

@dataclass(frozen=True)
class StreamFields:
    """What a source YAML says about one stream's fields: which hold a phone, an e-mail or a name,
    which payload fields a mapped field is read from, and which fields hold the cursor."""

    kinds: dict[str, str] = dc_field(default_factory=dict)                # field -> phone | email | name
    origins: dict[str, tuple[str, ...]] = dc_field(default_factory=dict)  # mapped field -> payload fields
    picks: dict[str, tuple[str, dict[str, str]]] = dc_field(default_factory=dict)  # mapped -> (switch, cases)
    cursor_fields: tuple[str, ...] = ()

    def kind(self, field) -> str | None:
        return self.kinds.get(field) or field_kind(field)

    def raw_value(self, field: str | None, payload):
        """The value of `field` in a quarantined payload: a raw record (extract, map) or a mapped row (validate)."""
        if not field or not isinstance(payload, dict):
            return None
        if field in payload:
            return payload[field]
        if field in self.picks:
            switch, cases = self.picks[field]
            chosen = payload.get(switch)
            origin = cases.get(str(chosen).strip()) if chosen is not None else None
            return payload.get(origin) if origin else None
        for name in self.origins.get(field, ()):
            value = payload.get(name)
            if value not in (None, ""):
                return value
        return None


_NO_FIELDS = StreamFields()


def stream_fields(stream) -> StreamFields:
    """The `StreamFields` of a `config.StreamConfig`."""
    kinds: dict[str, str] = {}
    origins: dict[str, tuple[str, ...]] = {}
    picks: dict[str, tuple[str, dict[str, str]]] = {}
    ident = stream.identity
    if ident is not None:
        kinds.update({p: "phone" for p in ident.phones})
        if ident.email:
            kinds[ident.email] = "email"
        if ident.name:
            kinds[ident.name] = "name"
    cursor_fields = [stream.cursor_field]
    for target, fm in stream.mapping.items():
        sources = ((fm.from_,) if isinstance(fm.from_, str) else tuple(fm.from_)) if fm.from_ else ()
        if sources:
            origins[target] = sources
        if fm.pick is not None:
            picks[target] = (fm.pick.field, dict(fm.pick.cases))
            sources = tuple(fm.pick.cases.values())
        if stream.cursor_field in sources:
            cursor_fields.append(target)
        kind = "phone" if fm.type == "phone" else field_kind(target)
        if kind is not None:
            kinds.setdefault(target, kind)
            for name in sources:
                kinds.setdefault(name, kind)
    return StreamFields(kinds, origins, picks, tuple(cursor_fields))


def source_fields(source: str) -> dict[str, StreamFields]:
    """stream -> `StreamFields` from the source's YAML; empty when it cannot be read (field names
    alone then say what is personal)."""
    from crm_sync import config

    path = config.source_path(source)
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return {}
    return _source_fields(str(path), stamp)


@lru_cache(maxsize=32)
def _source_fields(path: str, _stamp: int) -> dict[str, StreamFields]:
    from crm_sync import config

    try:
        cfg = config.load_source_file(Path(path))
    except Exception:  # noqa: BLE001 - a broken YAML fails its DAG elsewhere; masking falls back to names
        return {}
    return {s.name: stream_fields(s) for s in cfg.streams}


def mask_value(info: StreamFields | None, field: str | None, value) -> str:
    """One value of `field` as it may be shown (phone, e-mail and name fields masked whatever their shape)."""
    info = info or _NO_FIELDS
    if isinstance(value, (dict, list)):
        value = staging.to_json(value)
    kind = info.kind(field)
    shown = mask_field(kind or field, value)
    return shown if len(shown) <= 120 else shown[:120] + "…"


def mask_reason(reason, payload=None, info: StreamFields | None = None, field: str | None = None,
                value=None) -> str:
    """A reason as it may be shown: every value of a phone, e-mail or name field of the payload that
    the reason quotes is masked as its field says, then any phone or address left in the text."""
    info = info or _NO_FIELDS
    secrets: dict[str, str] = {}

    def note(name, raw) -> None:
        kind = info.kind(name)
        if kind is None or raw is None or isinstance(raw, (bool, dict, list)):
            return
        text = str(raw).strip()
        if len(text) >= 2:
            secrets[text] = mask_field(kind, text)

    if field and value is not None:
        note(field, value)
    if isinstance(payload, dict):
        for name, raw in payload.items():
            note(name, raw)
    text = str(reason or "")
    for raw in sorted(secrets, key=len, reverse=True):
        if raw in text:
            text = re.sub(rf"(?<!\w){re.escape(raw)}(?!\w)", lambda _m, shown=secrets[raw]: shown, text)
    return mask_text(text)


def _field_value(info: StreamFields, field: str | None, payload):
    return info.raw_value(field, payload) if field and "," not in field else None


def _masked_value(info: StreamFields | None, r: Reject) -> str | None:
    info = info or _NO_FIELDS
    value = _field_value(info, r.field, r.payload)
    return None if value is None else mask_value(info, r.field, value)


def shown_reason(source: str, stream: str, reason, payload=None, field: str | None = None) -> str:
    """A stored quarantine reason as it may be shown (alerts, reports, the command line)."""
    info = source_fields(source).get(stream) or _NO_FIELDS
    return mask_reason(reason, payload, info, field, _field_value(info, field, payload))


def default_actor() -> str:
    """Who a steward command acts as when `--by` is not given."""
    try:
        return os.environ.get("CRM_SYNC_USER") or getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in a container
        return "unknown"


# --- reading: summaries and rows -----------------------------------------------------------------

_KEY = "coalesce(q.source_pk, 'quarantine:' || q.quarantine_id)"


def _where(source=None, run_id=None, statuses=None, stream=None, rule=None, ids=None,
           blocking_only=True) -> tuple[str, dict]:
    clauses, params = [], {}
    for name, value, clause in (("source", source, "q.source = %(source)s"),
                                ("run_id", run_id, "q.run_id = %(run_id)s"),
                                ("stream", stream, "q.stream = %(stream)s"),
                                ("rule", rule, "q.reason_code = %(rule)s")):
        if value:
            clauses.append(clause)
            params[name] = value
    if statuses:
        unknown = sorted(set(statuses) - set(STATUSES))
        if unknown:
            raise ValueError(f"unknown quarantine status {unknown}; statuses are {list(STATUSES)}")
        clauses.append("q.status = any(%(statuses)s)")
        params["statuses"] = list(statuses)
    if ids:
        clauses.append("q.quarantine_id = any(%(ids)s)")
        params["ids"] = [int(i) for i in ids]
    if blocking_only:
        clauses.append("q.blocks_key")
    return " and ".join(clauses) or "true", params


def summary(conn, run_id: str | None = None, source: str | None = None, *, statuses: Iterable[str] | None = None,
            stream: str | None = None, rule: str | None = None, blocking_only: bool = True) -> list[dict]:
    """Quarantined rows grouped by source, stream, stage, rule and field, largest group first.

    Each group: `rows`, distinct `keys`, `runs`, rows per status, `example_value` and `example_reason`
    (of the group's first row, masked), `first_seen` / `last_seen`. `blocking_only` leaves out
    superseded versions (rows that never stopped a key from loading). All statuses unless
    `statuses` is given."""
    where, params = _where(source, run_id, statuses, stream, rule, blocking_only=blocking_only)
    status_counts = ", ".join(f"count(*) filter (where q.status = '{s}')" for s in STATUSES)
    with conn.cursor() as cur:
        cur.execute(
            f"""select q.source, q.stream, q.stage, q.reason_code, q.field, count(*),
                       count(distinct {_KEY}), count(distinct q.run_id), {status_counts},
                       min(q.quarantine_id), min(q.created_at), max(q.created_at)
                from sync.quarantine q where {where}
                group by 1, 2, 3, 4, 5
                order by 7 desc, 6 desc, 1, 2, 3, 4, 5""",
            params)
        found = cur.fetchall()
        cur.execute("select quarantine_id, masked_value, reason, payload from sync.quarantine"
                    " where quarantine_id = any(%s)", ([row[8 + len(STATUSES)] for row in found],))
        examples = {qid: rest for qid, *rest in cur.fetchall()}
    groups = []
    n = len(STATUSES)
    for row in found:
        source_, stream_, stage, code, field, rows, keys, runs = row[:8]
        by_status = {s: c for s, c in zip(STATUSES, row[8:8 + n]) if c}
        example, first, last = row[8 + n:]
        value, reason, payload = examples.get(example, (None, "", None))
        groups.append({"source": source_, "stream": stream_, "stage": stage, "rule": code, "field": field,
                       "rows": rows, "keys": keys, "runs": runs, "status": by_status, "example_value": value,
                       "example_reason": shown_reason(source_, stream_, reason, payload, field),
                       "first_seen": first, "last_seen": last})
    return groups


def list_rows(conn, *, source: str | None = None, run_id: str | None = None, statuses: Iterable[str] | None = None,
              stream: str | None = None, rule: str | None = None, ids: Iterable[int] | None = None,
              limit: int | None = 100, blocking_only: bool = True) -> list[dict]:
    """Quarantined rows, newest first, with their values and reasons masked."""
    where, params = _where(source, run_id, statuses, stream, rule, ids, blocking_only)
    params["limit"] = limit
    with conn.cursor() as cur:
        cur.execute(
            f"""select q.quarantine_id, q.source, q.run_id, q.stream, q.source_pk, q.stage, q.reason_code, q.field,
                       q.masked_value, q.reason, q.payload, q.status,
                       q.status_by, q.status_note, q.status_at, q.retry_run_id, q.blocks_key, q.created_at
                from sync.quarantine q where {where}
                order by q.created_at desc, q.quarantine_id desc limit %(limit)s""",
            params)
        found = cur.fetchall()
    out = []
    for (qid, source_, run, stream_, pk, stage, code, field, value, reason, payload, status, by, note, at, retry,
         blocks, created) in found:
        out.append({"id": qid, "source": source_, "run_id": run, "stream": stream_, "source_pk": pk,
                    "stage": stage, "rule": code, "field": field, "value": value,
                    "reason": shown_reason(source_, stream_, reason, payload, field), "status": status, "status_by": by,
                    "status_note": mask_text(note) if note else note, "status_at": at, "retry_run_id": retry,
                    "blocks_key": blocks, "created_at": created})
    return out


def group_rows(rows: Iterable[dict]) -> list[dict]:
    """Rows as `list_rows` or `expire` give them, grouped by source, stream, stage, rule and field."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = (r["source"], r["stream"], r["stage"], r["rule"], r["field"])
        g = groups.setdefault(key, {"source": key[0], "stream": key[1], "stage": key[2], "rule": key[3],
                                    "field": key[4], "rows": 0, "keys": set(), "example_value": r.get("value"),
                                    "example_reason": r.get("reason")})
        g["rows"] += 1
        g["keys"].add(r["source_pk"] if r["source_pk"] is not None else f"quarantine:{r['id']}")
    out = [{**g, "keys": len(g["keys"])} for g in groups.values()]
    return sorted(out, key=lambda g: (-g["keys"], -g["rows"], str(g["source"]), str(g["stream"]), str(g["rule"])))


# --- the steward's actions -----------------------------------------------------------------------

_ACTED = """
    , acted as (
        insert into sync.quarantine_action (quarantine_id, action, source, run_id, stream, source_pk, reason_code,
                                            field, masked_value, acted_by, note)
        select quarantine_id, %(action)s, source, run_id, stream, source_pk, reason_code, field, masked_value,
               %(by)s, %(note)s from changed
    )
    select quarantine_id, source, run_id, stream, source_pk, stage, reason_code, field, masked_value, reason,
           payload, created_at
    from changed order by quarantine_id
"""


def _changed(cur) -> list[dict]:
    out = []
    for qid, source, run, stream, pk, stage, code, field, value, reason, payload, created in cur.fetchall():
        out.append({"id": qid, "source": source, "run_id": run, "stream": stream, "source_pk": pk, "stage": stage,
                    "rule": code, "field": field, "value": value,
                    "reason": shown_reason(source, stream, reason, payload, field), "created_at": created})
    return out


def _act(conn, action: str, to_status: str, from_statuses: tuple[str, ...], source: str, *, run_id, stream, rule,
         ids, by, note, extra_set: str = "") -> list[dict]:
    if not source:
        raise ValueError("a source is required")
    where, params = _where(source, run_id, from_statuses, stream, rule, ids)
    params.update(action=action, to_status=to_status, by=by or default_actor(), note=note)
    with conn.cursor() as cur:
        cur.execute(
            f"""with changed as (
                    update sync.quarantine q set status = %(to_status)s, status_by = %(by)s, status_note = %(note)s,
                           status_at = now(){extra_set}
                    where {where}
                    returning q.*
                ){_ACTED}""",
            params)
        return _changed(cur)


def release(conn, source: str, *, run_id: str | None = None, stream: str | None = None, rule: str | None = None,
            ids: Iterable[int] | None = None, by: str | None = None, note: str | None = None) -> list[dict]:
    """Mark open (or expired) rows of `source` released; return them. The caller commits.

    A released key is read again by the next run of the source (`release_window`) and settled by
    that run's load (`settle`). Nothing is loaded by the release itself."""
    return _act(conn, "release", "released", ("open", "expired"), source, run_id=run_id, stream=stream, rule=rule,
                ids=ids, by=by, note=note, extra_set=", retry_run_id = null")


def discard(conn, source: str, *, reason: str, run_id: str | None = None, stream: str | None = None,
            rule: str | None = None, ids: Iterable[int] | None = None, by: str | None = None) -> list[dict]:
    """Mark open, released or expired rows of `source` discarded (given up), with who and why; return
    them. The rows stay (audit trail); only `purge` removes settled rows. The caller commits."""
    if not (reason or "").strip():
        raise ValueError("discarding needs a reason (why the rows are given up)")
    return _act(conn, "discard", "discarded", ("open", "released", "expired"), source, run_id=run_id, stream=stream,
                rule=rule, ids=ids, by=by, note=reason.strip())


# --- expiry and housekeeping ---------------------------------------------------------------------

def expiry_days(source: str | None = None, days: int | None = None) -> int:
    """How old an unsettled row may get: `days` if given, else the source YAML's
    `quarantine_expiry_days` (when the config declares it), else $CRM_SYNC_QUARANTINE_EXPIRY_DAYS, else 30."""
    if days is not None:
        value = int(days)
    else:
        value = None
        if source:
            try:
                from crm_sync.config import load_source

                value = getattr(load_source(source), "quarantine_expiry_days", None)
            except Exception:  # noqa: BLE001 - an unreadable YAML fails its own DAG; expiry keeps the default
                value = None
        if value is None and os.environ.get(EXPIRY_ENV):
            text = os.environ[EXPIRY_ENV]
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"{EXPIRY_ENV}={text!r} is not a whole number of days") from None
        value = DEFAULT_EXPIRY_DAYS if value is None else int(value)
    if value < 1:
        raise ValueError(f"the quarantine expiry must be at least 1 day, got {value}")
    return value


def expire(conn, *, source: str | None = None, days: int | None = None, now: datetime | None = None) -> list[dict]:
    """Expire what stayed unsettled too long; return the rows expired now (the final alert's content).

    A key (of a source and stream) whose oldest open or released row is older than the source's
    `expiry_days` has all its open and released rows marked `expired`. Superseded versions never
    expire (they never blocked anything). The caller commits, then alerts about the returned rows
    (`group_rows` groups them by rule and field)."""
    now = now or datetime.now(timezone.utc)
    expiry_days(source, days)  # a bad setting fails here, not only when some row is old enough
    with conn.cursor() as cur:
        if source:
            sources = [source]
        else:
            cur.execute("select distinct source from sync.quarantine where status in ('open', 'released') "
                        "and blocks_key order by 1")
            sources = [s for (s,) in cur.fetchall()]
        expired: list[dict] = []
        for name in sources:
            age = expiry_days(name, days)
            cur.execute(
                f"""with stale as (
                        select q.stream, {_KEY} as k from sync.quarantine q
                        where q.source = %(source)s and q.status in ('open', 'released') and q.blocks_key
                        group by 1, 2 having min(q.created_at) < %(cutoff)s
                    ), changed as (
                        update sync.quarantine q set status = 'expired', status_by = %(by)s, status_note = %(note)s,
                               status_at = %(now)s
                        from stale s
                        where q.source = %(source)s and q.stream = s.stream and {_KEY} = s.k
                          and q.status in ('open', 'released') and q.blocks_key
                        returning q.*
                    ){_ACTED}""",
                {"source": name, "cutoff": now - timedelta(days=age), "now": now, "action": "expire",
                 "by": "crm-sync expiry", "note": f"unsettled for more than {age} days"})
            expired += _changed(cur)
    if expired:
        log.info("quarantine: %d rows expired", len(expired))
    return expired


def purge(conn, older_than_days: int, *, source: str | None = None) -> int:
    """Delete settled rows (resolved, retried, discarded, expired) and superseded versions whose last
    change is older than `older_than_days`; return how many. Open and released rows are never
    purged; `sync.quarantine_action` keeps the stewards' actions. The caller commits."""
    if int(older_than_days) < 1:
        raise ValueError(f"purge keeps at least a day of history, got older_than_days={older_than_days}")
    with conn.cursor() as cur:
        cur.execute(
            """delete from sync.quarantine q
               where (q.status in ('resolved', 'retried', 'discarded', 'expired') or not q.blocks_key)
                 and coalesce(q.status_at, q.created_at) < now() - make_interval(days => %(days)s)
                 and (%(source)s::text is null or q.source = %(source)s)""",
            {"days": int(older_than_days), "source": source})
        return cur.rowcount


# --- retrying released keys: the extract window and the load's settlement -------------------------

def _parse_ts(value) -> datetime | None:
    if value in (None, ""):
        return None
    try:
        parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


_UNBOUNDED = object()  # a released key whose run read the whole history: the window must too


def _release_bounds(cur, source: str, stream, statuses=("released",)) -> dict[int, object]:
    """quarantine id -> the earliest cursor to read back to for a released row: its record's cursor
    when the payload holds a readable one, else the start of the window of the run that rejected it."""
    info = stream_fields(stream)
    cur.execute(
        """select q.quarantine_id, array(select q.payload ->> f from unnest(%(fields)s::text[]) f),
                  a.run_id is not null, a.window_since, l.extract_since
           from sync.quarantine q
           left join sync.stream_account a on a.run_id = q.run_id and a.source = q.source and a.stream = q.stream
           left join sync.run_log l on l.run_id = q.run_id and l.source = q.source
           where q.source = %(source)s and q.stream = %(stream)s and q.status = any(%(statuses)s) and q.blocks_key""",
        {"fields": list(info.cursor_fields), "source": source, "stream": stream.name, "statuses": list(statuses)})
    bounds: dict[int, object] = {}
    for qid, cursors, accounted, window_since, extract_since in cur.fetchall():
        cursor = next((c for c in map(_parse_ts, cursors or []) if c is not None), None)
        if cursor is not None:
            bounds[qid] = cursor
        elif accounted:
            bounds[qid] = window_since if window_since is not None else _UNBOUNDED
        else:
            bounds[qid] = extract_since if extract_since is not None else _UNBOUNDED
    return bounds


def release_window(conn, cfg, stream, window):
    """The extract window of a run, widened back so it reads the stream's released keys again.

    Call it where the run's window is decided (before extracting; not when a paging checkpoint is
    resumed). Unchanged for a full refresh (it reads every key anyway), a files source (no window:
    deliver the corrected file again) and when nothing is released."""
    from crm_sync.watermark import Window

    if cfg.kind == "files" or window.since is None:
        return window
    with conn.cursor() as cur:
        bounds = list(_release_bounds(cur, cfg.source, stream).values())
    if not bounds:
        return window
    since = None if any(b is _UNBOUNDED for b in bounds) else min(bounds) - cfg.lookback
    if since is not None and since >= window.since:
        return window
    log.info("%s.%s: %d released quarantine rows are read again: the window starts at %s instead of %s",
             cfg.source, stream.name, len(bounds), since.isoformat() if since else "the beginning",
             window.since.isoformat())
    return Window(since=since, until=window.until, sweep=window.sweep, normal_since=window.normal_since)


def settle(cur, run_id: str, cfg) -> dict:
    """Inside the load transaction of a run (after the upserts, before staging is purged): settle the
    unsettled quarantine rows of earlier runs this run answered. Returns the counts.

    - an open or released row whose key this run staged and accepted: `resolved`;
    - a released row whose key this run staged and rejected again: `retried` (this run's own row
      is the open one now); an open row rejected again stays open (its expiry age keeps running);
    - a released row of a stream this run read over a window covering it, whose key did not come
      back (deleted in the source): `retried`;
    - an open "customer not known yet" row whose held fact has since loaded: `resolved`.
    """
    params = {"run": run_id, "source": cfg.source}
    cur.execute(
        """update sync.quarantine q
           set status = case when again.hit is null then 'resolved' else 'retried' end,
               retry_run_id = %(run)s, status_at = now()
           from stg.extracted e
           left join lateral (select 1 as hit from sync.quarantine r
                              where r.run_id = e.run_id and r.source = e.source and r.stream = e.stream
                                and r.source_pk = e.source_pk and r.blocks_key limit 1) again on true
           where e.run_id = %(run)s and e.source = %(source)s
             and q.source = e.source and q.stream = e.stream and q.source_pk = e.source_pk
             and q.run_id <> %(run)s and q.blocks_key
             and (q.status = 'released' or (q.status = 'open' and again.hit is null))
           returning q.status""",
        params)
    settled = [s for (s,) in cur.fetchall()]
    counts = {"resolved": settled.count("resolved"), "retried": settled.count("retried"), "not_found": 0,
              "held_loaded": 0}
    if cfg.kind != "files":
        cur.execute("""select stream, window_since from sync.stream_account
                       where run_id = %(run)s and source = %(source)s and not partial""", params)
        read = dict(cur.fetchall())
        gone: list[int] = []
        for stream in cfg.streams:
            if stream.name not in read:
                continue
            since = read[stream.name]
            for qid, bound in _release_bounds(cur, cfg.source, stream).items():
                if since is None or (bound is not _UNBOUNDED and since <= bound):
                    gone.append(qid)
        if gone:
            cur.execute("""update sync.quarantine set status = 'retried', retry_run_id = %(run)s, status_at = now(),
                               status_note = coalesce(status_note || '; ', '') || 'not in the source any more'
                           where quarantine_id = any(%(ids)s) and status = 'released'""", {**params, "ids": gone})
            counts["not_found"] = cur.rowcount
    cur.execute(
        """update sync.quarantine q set status = 'resolved', retry_run_id = h.released_run_id, status_at = now()
           from sync.held_fact h
           where q.status = 'open' and q.blocks_key and q.reason_code = 'load.customer_not_known'
             and h.source = q.source and h.stream = q.stream and h.source_pk = q.source_pk
             and h.released_run_id is not null and h.released_run_id <> q.run_id""")
    counts["held_loaded"] = cur.rowcount
    return counts
