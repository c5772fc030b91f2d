"""`crm-sync status`: per source, the last run and its figures, reconciliation and watermarks.

Reads only bookkeeping tables (`sync.run_log`, `sync.watermark`, `crm.customer_link`); every value
is one the pipeline committed, so the report never shows a load that did not happen.
"""
from __future__ import annotations

from crm_sync import entities
from crm_sync.config import all_source_names

RUN_FIELDS = ["run_id", "state", "interval_start", "interval_end", "rows_extracted", "rows_mapped", "rows_loaded",
              "rows_rejected", "ids_linked", "ids_merged", "ids_review", "ids_new", "api_calls", "facts_held",
              "facts_released", "rows_unchanged", "rows_deleted", "late_rows", "partial", "reconcile_ok",
              "failed_task", "error", "started_at", "finished_at"]


def _iso(value):
    return value.isoformat() if hasattr(value, "isoformat") else value


def source_status(conn, source: str) -> dict | None:
    with conn.cursor() as cur:
        cur.execute(f"select {', '.join(RUN_FIELDS)} from sync.run_log where source = %s"
                    " order by started_at desc limit 1", (source,))
        row = cur.fetchone()
        last_run = {k: _iso(v) for k, v in zip(RUN_FIELDS, row)} if row else None
        cur.execute("select run_id, finished_at from sync.run_log where source = %s and state = 'success'"
                    " order by started_at desc limit 1", (source,))
        ok_row = cur.fetchone()
        cur.execute("select stream, cursor_value, cursor_pk, run_id from sync.watermark where source = %s"
                    " order by stream", (source,))
        marks = {s: {"cursor_value": _iso(v), "cursor_pk": pk, "run_id": rid} for s, v, pk, rid in cur.fetchall()}
        cur.execute("select count(*), count(distinct customer_id) from crm.customer_link where source = %s", (source,))
        links, customers = cur.fetchone()
        cur.execute("select stream, check_name, source_value, target_value, ok from sync.reconciliation"
                    " where run_id = %s and source = %s order by stream, check_name",
                    (last_run["run_id"] if last_run else None, source))
        recon = [{"stream": s, "check": c, "source": str(a), "target": str(b), "ok": ok}
                 for s, c, a, b, ok in cur.fetchall()]
        cur.execute("""select stream, source_rows, received, loaded, unchanged, quarantined, superseded, tombstones,
                              deleted, lost, late, partial
                       from sync.stream_account where run_id = %s and source = %s order by stream""",
                    (last_run["run_id"] if last_run else None, source))
        names = [d[0] for d in cur.description]
        accounts = [dict(zip(names, r)) for r in cur.fetchall()]
        rows, deleted = {}, {}
        for spec in entities.ENTITIES:
            cur.execute(f"select count(*) filter (where deleted_at is null), count(*) filter (where deleted_at is not null)"
                        f" from {spec.target} where source = %s", (source,))
            n, gone = cur.fetchone()
            if n:
                rows[spec.name] = n
            if gone:
                deleted[spec.name] = gone
        cur.execute("select count(*) from sync.held_fact where source = %s and released_run_id is null", (source,))
        held = cur.fetchone()[0]
    if last_run is None and not marks and not links:
        return None
    return {
        "source": source,
        "last_run": last_run,
        "last_success": {"run_id": ok_row[0], "finished_at": _iso(ok_row[1])} if ok_row else None,
        "reconciliation": recon,
        "watermarks": marks,
        "links": links,
        "linked_customers": customers,
        "rows": rows,
        "deleted_rows": deleted,
        "accounts": accounts,
        "held_facts": held,
    }


def all_status(conn) -> dict:
    with conn.cursor() as cur:
        cur.execute("select count(*) filter (where merged_into is null and deleted_at is null),"
                    " count(*) filter (where merged_into is not null) from crm.customer")
        active, merged = cur.fetchone()
        cur.execute("select count(*) from sync.quarantine")
        quarantined = cur.fetchone()[0]
    sources = {}
    for name in all_source_names():
        st = source_status(conn, name)
        sources[name] = st if st is not None else {"source": name, "last_run": None}
    return {"customers": active, "merged_customers": merged, "quarantined_rows": quarantined, "sources": sources}


def render(doc: dict) -> str:
    lines = [f"CRM master: {doc['customers']} customers ({doc['merged_customers']} merged away), "
             f"{doc['quarantined_rows']} rows in quarantine", ""]
    header = (f"{'source':<11} {'state':<8} {'extracted':>9} {'loaded':>7} {'rejected':>8} {'merged':>7} "
              f"{'review':>6} {'new':>6} {'recon':>6}  last run / watermark")
    lines.append(header)
    for name, st in doc["sources"].items():
        run = st.get("last_run")
        if not run:
            lines.append(f"{name:<11} {'never':<8}")
            continue
        recon = {True: "ok", False: "FAIL", None: "-"}[run.get("reconcile_ok")]
        marks = ", ".join(f"{s}={m['cursor_value']}" for s, m in st.get("watermarks", {}).items()) or "none"
        lines.append(f"{name:<11} {run['state']:<8} {run['rows_extracted']:>9} {run['rows_loaded']:>7} "
                     f"{run['rows_rejected']:>8} {run['ids_merged']:>7} {run['ids_review']:>6} {run['ids_new']:>6} "
                     f"{recon:>6}  {run['run_id']}")
        lines.append(f"{'':<11} watermark: {marks}")
        held = st.get("held_facts")
        rows = ", ".join(f"{k} {v}" for k, v in st.get("rows", {}).items())
        gone = ", ".join(f"{k} {v}" for k, v in st.get("deleted_rows", {}).items())
        lines.append(f"{'':<11} in the CRM: {rows or 'nothing yet'}"
                     + (f"; {held} facts waiting for their customer" if held else "")
                     + (f"; soft-deleted: {gone}" if gone else ""))
        for a in st.get("accounts", []):
            if a.get("loaded") is None:
                continue  # the run stopped before reconcile: nothing to account yet
            parts = [f"{a['loaded']} loaded", f"{a['unchanged']} unchanged", f"{a['quarantined']} quarantined"]
            parts += [f"{a[k]} {k}" for k in ("superseded", "tombstones") if a.get(k)]
            held_by = a["source_rows"] if a["source_rows"] is not None else a["received"]
            lines.append(f"{'':<11} {a['stream']}: source {held_by} = {' + '.join(parts)}; lost {a['lost']}"
                         + (f"; {a['deleted']} soft-deleted" if a.get("deleted") else "")
                         + (" (partial: resumes next run)" if a.get("partial") else "")
                         + (f"; {a['late']} late rows caught" if a.get("late") else ""))
        if run.get("error"):
            lines.append(f"{'':<11} failed at {run.get('failed_task')}: {run['error'][:300]}")
    return "\n".join(lines)
