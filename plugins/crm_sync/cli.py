"""The `crm-sync` command (also `python -m crm_sync`).

    crm-sync demo [--scenario NAME]   sample sources + every source DAG through real Airflow
    crm-sync status [--json]          per source: last run, figures, reconciliation, watermark
    crm-sync db-url                   the DSN of the CRM database in use
    crm-sync db-stop                  stop the embedded PostgreSQL
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
    return p


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
        if args.command == "match":
            from crm_sync.identity.offline import match_csv

            summary = match_csv(args.config, args.input, args.out)
            print(summary)
            return 0
    except db.DatabaseError as exc:
        print(f"crm-sync: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
