"""The `crm-sync` command (also `python -m crm_sync`).

    crm-sync demo [--scenario NAME]   sample sources + every source DAG through real Airflow
    crm-sync status [--json]          per source: last run, figures, reconciliation, watermark
    crm-sync db-url                   the DSN of the CRM database in use
    crm-sync db-stop                  stop the embedded PostgreSQL
    crm-sync review list [--json] [--status open|same|different|all]
                                      the identity review queue, with each pair's evidence
    crm-sync review decide REVIEW_ID same|different --by NAME [--note TEXT]
                                      a steward's decision; the next run applies it
    crm-sync override CUSTOMER_ID FIELD VALUE --by NAME
                                      a steward's value for a golden field
"""
from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    from crm_sync.demo import SCENARIOS

    p = argparse.ArgumentParser(prog="crm-sync", description="Keep one trustworthy customer master in PostgreSQL.")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="seed the sample sources and run every source DAG once through Airflow")
    demo.add_argument("--scenario", choices=SCENARIOS, help="replay a failure to see the gates work")
    status = sub.add_parser("status", help="per-source state of the last run, figures and watermarks")
    status.add_argument("--json", action="store_true", help="print one JSON document")
    sub.add_parser("db-url", help="print the DSN of the CRM database in use")
    sub.add_parser("db-stop", help="stop the embedded PostgreSQL (no-op with CRM_SYNC_DSN)")
    match = sub.add_parser("match", help="offline identity resolution of a CSV with a record_id column")
    match.add_argument("--config", required=True, help="match config (YAML)")
    match.add_argument("input", help="input CSV with a record_id column")
    match.add_argument("--out", required=True, help="output CSV: record_id, cluster_id, decision, score")
    review = sub.add_parser("review", help="the identity review queue: candidate pairs for a data steward")
    review_sub = review.add_subparsers(dest="review_command", required=True)
    rlist = review_sub.add_parser("list", help="list review items with score and per-field explanation")
    rlist.add_argument("--json", action="store_true", help="print one JSON document")
    rlist.add_argument("--status", default="open", choices=["open", "same", "different", "all"])
    decide = review_sub.add_parser("decide", help="record a decision; the next run of any source applies it")
    decide.add_argument("review_id", type=int)
    decide.add_argument("decision", choices=["same", "different"])
    decide.add_argument("--by", required=True, help="the steward's name")
    decide.add_argument("--note", help="why")
    override = sub.add_parser("override", help="set a golden field of a customer by hand (wins per survivorship.yaml)")
    override.add_argument("customer_id")
    override.add_argument("field", choices=["full_name", "phone", "email", "company", "city"])
    override.add_argument("value")
    override.add_argument("--by", required=True, help="the steward's name")
    return p


def _review_list(conn, status: str) -> list[dict]:
    with conn.cursor() as cur:
        cur.execute(
            """select review_id, status, probability, reason, source_a, source_id_a, source_b, source_id_b,
                      customer_a::text, customer_b::text, explanation, decided_by, decided_at, note,
                      applied_run_id, created_run_id, created_at
               from crm.review_item where %(status)s = 'all' or status = %(status)s
               order by probability desc, review_id""",
            {"status": status},
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def _render_review(items: list[dict]) -> str:
    if not items:
        return "no review items"
    lines = []
    for it in items:
        lines.append(f"#{it['review_id']} [{it['status']}] p={float(it['probability']):.4f} ({it['reason']}): "
                     f"{it['source_a']}:{it['source_id_a']} <-> {it['source_b']}:{it['source_id_b']}")
        fields = (it["explanation"] or {}).get("fields", {})
        for name, f in fields.items():
            if isinstance(f, dict):
                lines.append(f"    {name:<11} {str(f.get('level', '')):<14} {f.get('weight', '')}")
        if it["decided_by"]:
            lines.append(f"    decided by {it['decided_by']} at {it['decided_at']}"
                         + (f": {it['note']}" if it["note"] else "")
                         + (f" (applied by run {it['applied_run_id']})" if it["applied_run_id"] else " (not applied yet)"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from crm_sync import db

    try:
        if args.command == "demo":
            from crm_sync.demo import run_demo

            return run_demo(args.scenario)
        if args.command == "status":
            from crm_sync import status

            with db.connection() as conn:
                db.migrate(conn)
                doc = status.all_status(conn)
            print(json.dumps(doc, indent=2, ensure_ascii=False, default=str) if args.json else status.render(doc))
            return 0
        if args.command == "db-url":
            print(db.resolve_dsn())
            return 0
        if args.command == "db-stop":
            print("stopped" if db.stop_embedded() else "not running")
            return 0
        if args.command == "review":
            with db.connection() as conn:
                db.migrate(conn)
                if args.review_command == "list":
                    items = _review_list(conn, args.status)
                    print(json.dumps(items, indent=2, ensure_ascii=False, default=str) if args.json
                          else _render_review(items))
                    return 0
                from crm_sync.identity.apply import decide

                try:
                    with conn.cursor() as cur:
                        item = decide(cur, args.review_id, args.decision, args.by, args.note)
                    conn.commit()
                except (LookupError, ValueError) as exc:
                    print(f"crm-sync: {exc}", file=sys.stderr)
                    return 1
                print(f"review #{item['review_id']}: {item['status']} (applied by the next run)")
                return 0
        if args.command == "override":
            from crm_sync.identity.apply import set_override

            with db.connection() as conn:
                db.migrate(conn)
                try:
                    with conn.cursor() as cur:
                        done = set_override(cur, args.customer_id, args.field, args.value, args.by)
                    conn.commit()
                except (LookupError, ValueError) as exc:
                    print(f"crm-sync: {exc}", file=sys.stderr)
                    return 1
                print(f"customer {done['customer_id']}: {done['field']} = {done['value']} (override)")
                return 0
        if args.command == "match":
            from crm_sync.identity.offline import match_csv

            summary = match_csv(args.config, args.input, args.out)
            print(summary)
            return 0
    except db.DatabaseError as exc:
        print(f"crm-sync: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:  # config and input errors name the file and field
        print(f"crm-sync {args.command}: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
