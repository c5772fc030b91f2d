"""Watermarks: how far each (source, stream) has been loaded.

Guarantees (`extract_window`):
- A run reads its own data interval: `[min(data_interval_start, watermark) - lookback,
  data_interval_end)`. The upper bound is never the wall clock. The watermark only widens the
  window backwards, so intervals the scheduler skipped (catchup off, scheduler down) are read by
  the next run, and a rerun or backfill of an old interval reads that interval — not "from the
  watermark on", which would read nothing.
- The first run of an incremental source (no watermark) reads the whole history; a backfill run
  before any watermark reads just its interval.
- Full-refresh sources, and any run triggered with `full_refresh`, have no lower bound.
- Trigger-form params override the window: `window_start` / `window_end` (ISO timestamps).
- The late-row sweep: a run whose interval ends on the source's `sweep.schedule` (or triggered
  with `sweep`) reads `sweep.horizon_hours` back, so rows committed after the lookback passed
  are still caught.
- `advance` runs inside the load transaction: the watermark moves only when the load commits,
  and never backwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from crm_sync.config import SourceConfig


@dataclass(frozen=True)
class Watermark:
    cursor_value: datetime
    cursor_pk: str | None
    run_id: str


@dataclass(frozen=True)
class Window:
    since: datetime | None
    until: datetime
    sweep: bool = False       # the late-row sweep: rows older than the usual window are "late"
    normal_since: datetime | None = None  # where the window would have started without the sweep


def read(conn, source: str, stream: str) -> Watermark | None:
    with conn.cursor() as cur:
        cur.execute(
            "select cursor_value, cursor_pk, run_id from sync.watermark where source = %s and stream = %s",
            (source, stream),
        )
        row = cur.fetchone()
    return Watermark(*row) if row else None


def _ts(value) -> datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def is_sweep(cfg: SourceConfig, interval_end: datetime) -> bool:
    """Whether a run ending at `interval_end` is the source's late-row sweep."""
    if cfg.sweep is None:
        return False
    from croniter import croniter
    from zoneinfo import ZoneInfo

    local = interval_end.astimezone(ZoneInfo(cfg.timezone)).replace(tzinfo=None)
    return croniter.match(cfg.sweep.schedule, local)


def extract_window(conn, cfg: SourceConfig, stream: str, interval_end: datetime,
                   interval_start: datetime | None = None, params: dict | None = None,
                   run_type: str | None = None) -> Window:
    params = params or {}
    until = _ts(params.get("window_end")) or interval_end
    if params.get("window_start"):
        return Window(since=_ts(params["window_start"]), until=until)
    if cfg.sync_mode == "full" or params.get("full_refresh"):
        return Window(since=None, until=until)
    mark = read(conn, cfg.source, stream)
    start = interval_start if interval_start is not None and interval_start < until else None
    if mark is None:
        since = start - cfg.lookback if (start is not None and run_type == "backfill") else None
    else:
        since = min(start, mark.cursor_value) if start is not None else mark.cursor_value
        since -= cfg.lookback
    if cfg.sweep is not None and (params.get("sweep") or is_sweep(cfg, until)):
        horizon = until - timedelta(hours=cfg.sweep.horizon_hours)
        if since is not None and horizon < since:
            return Window(since=horizon, until=until, sweep=True, normal_since=since)
    return Window(since=since, until=until)


def advance(cur, source: str, stream: str, run_id: str) -> None:
    """Move the watermark to the newest cursor this run extracted (inside the load transaction).

    Not for a stream the run read only in part (call budget spent): its unread rows may be older
    than what it read, so the watermark stays and the next run resumes the paging."""
    cur.execute(
        """
        insert into sync.watermark as w (source, stream, cursor_value, cursor_pk, run_id, updated_at)
        select source, stream, cursor_value, source_pk, run_id, now()
        from (select source, stream, cursor_value, source_pk, run_id from stg.extracted
              where run_id = %(run)s and source = %(source)s and stream = %(stream)s and cursor_value is not null
              union all
              select source, stream, cursor_value, source_pk, run_id from stg.tombstone
              where run_id = %(run)s and source = %(source)s and stream = %(stream)s and cursor_value is not null) x
        where not exists (select 1 from sync.stream_account a where a.run_id = %(run)s and a.source = %(source)s
                            and a.stream = %(stream)s and a.partial)
        order by cursor_value desc, source_pk desc
        limit 1
        on conflict (source, stream) do update
            set cursor_value = excluded.cursor_value, cursor_pk = excluded.cursor_pk,
                run_id = excluded.run_id, updated_at = excluded.updated_at
            where (excluded.cursor_value, excluded.cursor_pk) > (w.cursor_value, coalesce(w.cursor_pk, ''))
        """,
        {"run": run_id, "source": source, "stream": stream},
    )
