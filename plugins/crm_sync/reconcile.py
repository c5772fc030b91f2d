"""Reconcile stage: prove that what was extracted is what the CRM now holds.

Per stream of the run, recorded in `sync.reconciliation`:
- `source_rows`: every row the source handed over (and, where it can say, every row it holds in
  the window: checked at extract) is loaded, unchanged, quarantined with a reason, a superseded
  older version, or a tombstone — `lost` must be 0. The figures go to `sync.stream_account`;
- `row_count`: rows extracted = rows loaded + rows quarantined;
- `distinct_keys`: every accepted source key is present in the target with this run's content;
- `<column>_sum` for each money sum the entity declares (`entities.EntitySpec.sums`): the exact
  NUMERIC sum of the accepted rows' values as the map stage parsed them from the source's text
  (`Decimal`, never float) equals the target's sum for the same keys.
Any mismatch raises `ReconciliationError` (the task fails and on-call is alerted).
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from crm_sync import entities, runlog
from crm_sync.config import SourceConfig, StreamConfig
from crm_sync.quarantine import ACCEPTED


class ReconciliationError(RuntimeError):
    """Source and target disagree after a load."""


@dataclass(frozen=True)
class Check:
    stream: str
    name: str
    source_value: Decimal
    target_value: Decimal

    @property
    def ok(self) -> bool:
        return self.source_value == self.target_value


def _stream_checks(cur, run_id: str, source: str, stream: StreamConfig) -> list[Check]:
    spec = entities.get(stream.entity)
    target, key, mapped = spec.target, spec.key, spec.staging
    params = {"run": run_id, "source": source, "stream": stream.name}
    cur.execute(
        """select
             (select count(*) from stg.extracted where run_id = %(run)s and source = %(source)s and stream = %(stream)s)
           + (select count(*) from sync.quarantine where run_id = %(run)s and source = %(source)s
                and stream = %(stream)s and stage = 'extract' and blocks_key)""",
        params,
    )
    extracted = cur.fetchone()[0]
    accepted = f"""
        from {mapped} m where m.run_id = %(run)s and m.source = %(source)s and m.stream = %(stream)s
         and {ACCEPTED}"""
    cur.execute(f"select count(*) {accepted}", params)
    accepted_rows = cur.fetchone()[0]
    cur.execute(
        """select count(distinct coalesce(source_pk, 'quarantine:' || quarantine_id)) from sync.quarantine
           where run_id = %(run)s and source = %(source)s and stream = %(stream)s and blocks_key""",
        params,
    )
    quarantined = cur.fetchone()[0]
    # a scalar subquery: one primary-key lookup per accepted row (an EXISTS may become a scan of the target)
    cur.execute(
        f"""select count(*) {accepted}
              and (select t.row_hash from {target} t where t.source = m.source and t.{key} = m.source_pk)
                  = m.row_hash""",
        params,
    )
    present = cur.fetchone()[0]
    checks = [
        Check(stream.name, "row_count", Decimal(extracted), Decimal(accepted_rows + quarantined)),
        Check(stream.name, "distinct_keys", Decimal(accepted_rows), Decimal(present)),
    ]
    account = _account(cur, params, spec)
    if account is not None:
        checks.append(account)
    for column in spec.sums:
        cur.execute(
            f"""select (select coalesce(sum(m.{column}), 0) {accepted}),
                       (select coalesce(sum(t.{column}), 0) from {target} t
                        where t.source = %(source)s and t.{key} in (select m.source_pk {accepted}))""",
            params,
        )
        source_sum, target_sum = cur.fetchone()
        checks.append(Check(stream.name, f"{column}_sum", Decimal(source_sum), Decimal(target_sum)))
    return checks


def _account(cur, params: dict, spec) -> Check | None:
    """Where every received row went; fills `sync.stream_account` and returns the `source_rows` check."""
    cur.execute("""select received, source_rows, quarantined, superseded, tombstones, late_since
                   from sync.stream_account where run_id = %(run)s and source = %(source)s and stream = %(stream)s""",
                params)
    row = cur.fetchone()
    if row is None:  # the stream was not extracted by this run (trigger param `streams`)
        return None
    received, source_rows, q_extract, superseded, tombstones, late_since = row
    target, key = spec.target, spec.key
    # the rows' cursors matter only to a sweep's count of late rows: without one, no join with the
    # extracted rows (at a million customers and 2.5 million orders, most of the reconcile stage)
    late_rows, extracted = ("count(*) filter (where t.loaded_run_id = %(run)s and e.cursor_value < %(late)s)",
                            """join stg.extracted e on e.run_id = m.run_id and e.source = m.source
                                and e.stream = m.stream and e.source_pk = m.source_pk""") \
        if late_since is not None else ("0", "")
    from crm_sync import facts

    # an hourly run's rows look their target rows up by key (a lateral lookup kept apart by `offset 0`:
    # as a plain join the planner may hash the whole target); a bulk run joins them wholesale
    lookup = "" if facts._bulk(cur, spec, params) else "offset 0"
    cur.execute(
        f"""select count(*) filter (where t.loaded_run_id = %(run)s),
                   count(*) filter (where t.loaded_run_id is distinct from %(run)s),
                   {late_rows}
            from {spec.staging} m
            {extracted}
            cross join lateral (select t.loaded_run_id from {target} t
                                where t.source = m.source and t.{key} = m.source_pk {lookup}) t
            where m.run_id = %(run)s and m.source = %(source)s and m.stream = %(stream)s and {ACCEPTED}""",
        {**params, "late": late_since},
    )
    loaded, unchanged, late = cur.fetchone()
    cur.execute(
        """select count(distinct source_pk) from sync.quarantine where run_id = %(run)s and source = %(source)s
             and stream = %(stream)s and stage <> 'extract' and blocks_key""", params)
    q_later = cur.fetchone()[0]
    cur.execute(f"select count(*) from {target} where source = %(source)s and deleted_at is not null"
                f" and deleted_run_id = %(run)s", params)
    deleted = cur.fetchone()[0]
    accounted = loaded + unchanged + q_extract + q_later + superseded + tombstones
    lost = received - accounted
    cur.execute(
        """update sync.stream_account set loaded = %s, unchanged = %s, quarantined = %s, deleted = %s, lost = %s,
               late = %s, updated_at = now()
           where run_id = %s and source = %s and stream = %s""",
        (loaded, unchanged, q_extract + q_later, deleted, lost, late if late_since else None,
         params["run"], params["source"], params["stream"]))
    return Check(params["stream"], "source_rows", Decimal(source_rows if source_rows is not None else received),
                 Decimal(accounted))


def reconcile(conn, run_id: str, cfg: SourceConfig) -> list[Check]:
    checks: list[Check] = []
    with conn.cursor() as cur:
        for stream in cfg.streams:
            checks.extend(_stream_checks(cur, run_id, cfg.source, stream))
        cur.execute("delete from sync.reconciliation where run_id = %s and source = %s", (run_id, cfg.source))
        for c in checks:
            cur.execute(
                """insert into sync.reconciliation (run_id, source, stream, check_name, source_value, target_value, ok)
                   values (%s, %s, %s, %s, %s, %s, %s)""",
                (run_id, cfg.source, c.stream, c.name, c.source_value, c.target_value, c.ok),
            )
        ok = all(c.ok for c in checks)
        runlog.update(cur, run_id, cfg.source, reconcile_ok=ok)
        cur.execute(
            # rows_loaded becomes what this run wrote (the load counted every accepted row, unchanged ones too)
            """update sync.run_log l set rows_unchanged = a.unchanged, rows_deleted = a.deleted, late_rows = a.late,
                      rows_loaded = case when a.n > 0 then a.loaded else l.rows_loaded end
               from (select count(*) as n, coalesce(sum(loaded), 0) as loaded,
                            coalesce(sum(unchanged), 0) as unchanged, coalesce(sum(deleted), 0) as deleted,
                            coalesce(sum(late), 0) as late
                     from sync.stream_account where run_id = %(run)s and source = %(source)s) a
               where l.run_id = %(run)s and l.source = %(source)s""",
            {"run": run_id, "source": cfg.source})
    conn.commit()
    failed = [c for c in checks if not c.ok]
    if failed:
        raise ReconciliationError(
            f"source '{cfg.source}' run '{run_id}': reconciliation failed: "
            + "; ".join(f"{c.stream}.{c.name}: source {c.source_value} != target {c.target_value}" for c in failed)
        )
    return checks
