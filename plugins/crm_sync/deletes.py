"""Deletes: source records the source no longer holds are soft-deleted in the CRM, behind a brake.

Two ways a delete reaches the load:
- a **full snapshot** lists every key the source holds (`stg.snapshot_key`, read in the same
  snapshot as the rows); a live target row of the source whose key is not in the list is deleted;
- an **incremental** stream may declare a tombstone field (`tombstone:` in the stream's YAML); a
  record carrying it is staged in `stg.tombstone`, not loaded, and its key is deleted.

Guarantees:
- `plan()` only reads; `check_brake()` raises `DeleteBrakeError` before anything is written when a
  snapshot would delete more than the source's `max_delete_share` of a stream's live rows (a
  truncated export or an empty table read by mistake must not empty the CRM). The trigger param
  `allow_deletes` releases the brake for one run. Tombstones are explicit and never braked.
- `apply()` sets `deleted_at` / `deleted_run_id`, drops facts still waiting for their customer in
  `sync.held_fact`, and recomputes the golden record of every customer that lost a source record
  from what is left (`crm.customer.deleted_at` is set when nothing is left). Nothing is removed: a
  key that comes back is revived by the load's upsert.
- A stream whose extract listed no keys (the source cannot list them, or the run read only some
  streams) deletes nothing by snapshot.
"""
from __future__ import annotations

from dataclasses import dataclass

from crm_sync import entities
from crm_sync.config import SourceConfig

PLAN = "delete_plan"   # temp table (stream, source_pk, why) of the load transaction


class DeleteBrakeError(RuntimeError):
    """A full snapshot would delete more of a stream than the source allows: the run stops before load."""


@dataclass(frozen=True)
class StreamDeletes:
    stream: str
    live: int          # rows of the source in the target before this run (not deleted)
    missing: int       # of those, keys the snapshot no longer holds
    tombstoned: int    # keys a tombstone deletes

    @property
    def share(self) -> float:
        return self.missing / self.live if self.live else 0.0


def plan(cur, run_id: str, cfg: SourceConfig) -> list[StreamDeletes]:
    """Fill the temp table `delete_plan` with the keys this run deletes; return figures per stream."""
    cur.execute(f"create temp table if not exists {PLAN} (stream text, source_pk text, why text) on commit drop")
    cur.execute(f"truncate {PLAN}")
    cur.execute("""select stream, snapshot_keys from sync.stream_account
                   where run_id = %s and source = %s and snapshot_keys is not null""", (run_id, cfg.source))
    listed = dict(cur.fetchall())
    out: list[StreamDeletes] = []
    for stream in cfg.streams:
        spec = entities.get(stream.entity)
        params = {"run": run_id, "source": cfg.source, "stream": stream.name}
        missing = live = 0
        if stream.name in listed:
            cur.execute(f"select count(*) from {spec.target} where source = %(source)s and deleted_at is null",
                        params)
            live = cur.fetchone()[0]
            cur.execute(
                f"""insert into {PLAN} (stream, source_pk, why)
                    select %(stream)s, t.{spec.key}, 'snapshot' from {spec.target} t
                    where t.source = %(source)s and t.deleted_at is null
                      and not exists (select 1 from stg.snapshot_key k
                                      where k.run_id = %(run)s and k.source = %(source)s and k.stream = %(stream)s
                                        and k.source_pk = t.{spec.key})""", params)
            missing = cur.rowcount
        cur.execute(
            f"""insert into {PLAN} (stream, source_pk, why)
                select %(stream)s, k.source_pk, 'tombstone' from stg.tombstone k
                join {spec.target} t on t.source = k.source and t.{spec.key} = k.source_pk and t.deleted_at is null
                where k.run_id = %(run)s and k.source = %(source)s and k.stream = %(stream)s""", params)
        tombstoned = cur.rowcount
        if missing or tombstoned or stream.name in listed:
            out.append(StreamDeletes(stream.name, live, missing, tombstoned))
    cur.execute(f"analyze {PLAN}")
    return out


def check_brake(cfg: SourceConfig, planned: list[StreamDeletes], *, allowed: bool = False) -> None:
    """Stop the run before load when a snapshot would delete more than `max_delete_share` of a stream."""
    over = [d for d in planned if d.missing and d.share > cfg.max_delete_share]
    if not over or allowed:
        return
    lines = "; ".join(f"stream '{d.stream}': {d.missing} of {d.live} rows in the CRM ({d.share:.0%}) are missing "
                      "from the source's snapshot" for d in over)
    raise DeleteBrakeError(
        f"source '{cfg.source}': delete brake — {lines}, more than max_delete_share "
        f"{cfg.max_delete_share:.0%}. Nothing was loaded or deleted and the watermark did not move. A truncated "
        "export or an emptied source table looks like this: check the source first. If the rows really are "
        "gone, trigger the DAG with {\"allow_deletes\": true} (or raise max_delete_share in "
        f"include/sources/{cfg.source}.yaml).")


def apply(cur, run_id: str, cfg: SourceConfig) -> int:
    """Soft-delete the planned keys (after the run's upserts); recompute the customers concerned."""
    deleted = 0
    customers: set = set()
    for stream in cfg.streams:
        spec = entities.get(stream.entity)
        returning = ", t.customer_id" if spec is entities.CUSTOMER else ""
        cur.execute(
            f"""update {spec.target} t set deleted_at = now(), deleted_run_id = %(run)s
                from {PLAN} p
                where p.stream = %(stream)s and t.source = %(source)s and t.{spec.key} = p.source_pk
                  and t.deleted_at is null
                returning t.{spec.key}{returning}""",
            {"run": run_id, "source": cfg.source, "stream": stream.name})
        rows = cur.fetchall()
        deleted += len(rows)
        if returning:
            customers.update(r[1] for r in rows)
        # facts still waiting for their customer: a tombstoned key, or one the snapshot no longer lists
        cur.execute(
            f"""delete from sync.held_fact h
                where h.source = %(source)s and h.stream = %(stream)s and h.released_run_id is null
                  and (exists (select 1 from {PLAN} p where p.stream = h.stream and p.source_pk = h.source_pk)
                       or exists (select 1 from stg.tombstone k where k.run_id = %(run)s and k.source = h.source
                                  and k.stream = h.stream and k.source_pk = h.source_pk)
                       or (exists (select 1 from sync.stream_account a where a.run_id = %(run)s
                                   and a.source = h.source and a.stream = h.stream and a.snapshot_keys is not null)
                           and not exists (select 1 from stg.snapshot_key k where k.run_id = %(run)s
                                           and k.source = h.source and k.stream = h.stream
                                           and k.source_pk = h.source_pk)))""",
            {"run": run_id, "source": cfg.source, "stream": stream.name})
    if customers:
        from crm_sync import survivorship

        survivorship.refresh(cur, run_id, customer_ids=sorted(customers, key=str))
    return deleted
