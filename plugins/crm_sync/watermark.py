"""Watermarks: how far each (source, stream) has been loaded.

Guarantees:
- The extract window is `[watermark - lookback, data_interval_end)`: bounded above by the run's
  data interval (never the wall clock), and below by the stored watermark, so manual runs and
  reruns fall back to what was actually loaded. Full-refresh sources have no lower bound.
- `advance` runs inside the load transaction: the watermark moves only when the load commits,
  and never backwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

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


def read(conn, source: str, stream: str) -> Watermark | None:
    with conn.cursor() as cur:
        cur.execute(
            "select cursor_value, cursor_pk, run_id from sync.watermark where source = %s and stream = %s",
            (source, stream),
        )
        row = cur.fetchone()
    return Watermark(*row) if row else None


def extract_window(conn, cfg: SourceConfig, stream: str, interval_end: datetime) -> Window:
    if cfg.sync_mode == "full":
        return Window(since=None, until=interval_end)
    mark = read(conn, cfg.source, stream)
    since = mark.cursor_value - cfg.lookback if mark else None
    return Window(since=since, until=interval_end)


def advance(cur, source: str, stream: str, run_id: str) -> None:
    """Move the watermark to the newest cursor this run extracted (inside the load transaction)."""
    cur.execute(
        """
        insert into sync.watermark as w (source, stream, cursor_value, cursor_pk, run_id, updated_at)
        select source, stream, cursor_value, source_pk, run_id, now()
        from stg.extracted
        where run_id = %s and source = %s and stream = %s and cursor_value is not null
        order by cursor_value desc, source_pk desc
        limit 1
        on conflict (source, stream) do update
            set cursor_value = excluded.cursor_value, cursor_pk = excluded.cursor_pk,
                run_id = excluded.run_id, updated_at = excluded.updated_at
            where (excluded.cursor_value, excluded.cursor_pk) > (w.cursor_value, coalesce(w.cursor_pk, ''))
        """,
        (run_id, source, stream),
    )
