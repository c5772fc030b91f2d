"""Volume gate: a full-refresh batch that shrinks sharply against the last good run is blocked.

A nightly full extract that suddenly returns a tenth of yesterday's rows is almost always a broken
export, a truncated table or a wrong connection, not a business event; loading it would be
harmless only because loads are upserts, but it also means every downstream count is wrong.
Guarantee: for `sync_mode: full` sources, when this run extracted fewer than
`(1 - max_volume_drop) *` the rows of the stream's last successful run, the result is recorded in
`sync.dq_result` and `DataQualityError` is raised (the batch is blocked, the watermark stays).
Incremental batches vary by nature and are not checked here.
"""
from __future__ import annotations

from crm_sync import staging
from crm_sync.config import SourceConfig, StreamConfig
from crm_sync.quality.validate import DataQualityError

CHECK = "volume_not_below_last_success"


def previous_volume(cur, source: str, stream: str) -> int | None:
    cur.execute(
        """select r.source_value from sync.reconciliation r
           join sync.run_log l on l.run_id = r.run_id and l.source = r.source
           where r.source = %s and r.stream = %s and r.check_name = 'row_count' and l.state = 'success'
           order by l.started_at desc limit 1""",
        (source, stream),
    )
    row = cur.fetchone()
    return int(row[0]) if row else None


def check_volume(conn, run_id: str, cfg: SourceConfig, stream: StreamConfig) -> dict | None:
    if cfg.sync_mode != "full":
        return None
    with conn.cursor() as cur:
        previous = previous_volume(cur, cfg.source, stream.name)
        if not previous:
            return None
        cur.execute("select count(*) from stg.extracted where run_id = %s and source = %s and stream = %s",
                    (run_id, cfg.source, stream.name))
        current = cur.fetchone()[0]
        floor = previous * (1 - cfg.max_volume_drop)
        ok = current >= floor
        cur.execute("delete from sync.dq_result where run_id = %s and source = %s and stream = %s and expectation = %s",
                    (run_id, cfg.source, stream.name, CHECK))
        cur.execute(
            """insert into sync.dq_result (run_id, source, stream, expectation, column_name, severity, success,
                   element_count, unexpected_count, detail) values (%s, %s, %s, %s, '', 'critical', %s, %s, %s, %s)""",
            (run_id, cfg.source, stream.name, CHECK, ok, current, max(0, previous - current),
             staging.to_json({"previous_success_rows": previous, "max_volume_drop": cfg.max_volume_drop})),
        )
    if not ok:
        conn.commit()  # keep the evidence before failing the task
        raise DataQualityError(
            f"source '{cfg.source}' stream '{stream.name}': volume dropped from {previous} rows (last successful "
            f"run) to {current} rows, more than the allowed {cfg.max_volume_drop:.0%}. The batch is blocked: "
            "nothing was loaded and the watermark did not move. Check the source export; if the drop is real, "
            f"raise max_volume_drop in include/sources/{cfg.source}.yaml or rerun after confirming."
        )
    return {"previous": previous, "current": current}
