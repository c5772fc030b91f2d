"""Reconcile stage: prove that what was extracted is what the CRM now holds.

Per stream of the run, recorded in `sync.reconciliation`:
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
                and stream = %(stream)s and stage = 'extract')""",
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
           where run_id = %(run)s and source = %(source)s and stream = %(stream)s""",
        params,
    )
    quarantined = cur.fetchone()[0]
    cur.execute(
        f"""select count(*) {accepted}
              and exists (select 1 from {target} t where t.source = m.source and t.{key} = m.source_pk
                          and t.row_hash = m.row_hash)""",
        params,
    )
    present = cur.fetchone()[0]
    checks = [
        Check(stream.name, "row_count", Decimal(extracted), Decimal(accepted_rows + quarantined)),
        Check(stream.name, "distinct_keys", Decimal(accepted_rows), Decimal(present)),
    ]
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
    conn.commit()
    failed = [c for c in checks if not c.ok]
    if failed:
        raise ReconciliationError(
            f"source '{cfg.source}' run '{run_id}': reconciliation failed: "
            + "; ".join(f"{c.stream}.{c.name}: source {c.source_value} != target {c.target_value}" for c in failed)
        )
    return checks
