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
    crm-sync quarantine list [--source S] [--run R] [--rows] [--json]
                                      rejected rows grouped by rule and field (values masked)
    crm-sync quarantine release --source S [--run R] [--rule X] [--id N ...]
                                      read those keys again in the source's next run
    crm-sync quarantine discard --source S (--run R | --rule X | --id N ... | --all) --reason TEXT
                                      give rows up, with who and why (they stay on record)
    crm-sync quarantine expire|purge  housekeeping: expire unsettled rows, delete settled ones
    crm-sync identity estimate [--source S] [--sample N] [--by NAME] [--json]
                                      estimate m/u and the prior by EM over a sample of the master
                                      and store them: every resolve run after uses them
    crm-sync report --source S [--run R] [--json]
                                      (re)build a run's quality report and print its path
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
    _quarantine_parser(sub)
    identity = sub.add_parser("identity", help="identity resolution: the match parameters the resolve stage uses")
    identity_sub = identity.add_subparsers(dest="identity_command", required=True)
    estimate = identity_sub.add_parser(
        "estimate", help="estimate m/u and the prior (EM over a sample of the master) and store them for resolve",
        description="Estimate the match config's m/u and prior on the live master (u by random sampling, m by EM "
                    "on blocked pairs), as bench_identity.py --print-params does on the evaluation set, and store "
                    "them with the time in crm.match_params. Every resolve run after reads the latest estimate for "
                    "its source (else the whole master's, else the match config's values); no run estimates on "
                    "its own. Run it after a first load and when the data changes character, or on a schedule.")
    estimate.add_argument("--source", help="sample this source's records only (its runs prefer this estimate)")
    estimate.add_argument("--sample", type=int, default=None,
                          help="master records to read at most (default 200,000; a random sample beyond that)")
    estimate.add_argument("--by", default=None, help="who asked (stored with the estimate; default: $USER)")
    estimate.add_argument("--json", action="store_true", help="print the stored estimate as JSON")
    report = sub.add_parser("report", help="(re)build the quality report of a run and print its path")
    report.add_argument("--source", required=True)
    report.add_argument("--run", help="run id (default: the source's latest run)")
    report.add_argument("--json", action="store_true", help="print the path of the JSON report instead of the HTML")
    return p


_STATUS_CHOICES = ["open", "released", "resolved", "retried", "discarded", "expired", "unsettled", "all"]

_RELEASE_HELP = """\
Mark open (or expired) quarantine rows released so the next run of the source reads those keys
again from the source as it is then, and maps and validates them like any other row. Nothing is
loaded by the release itself, and a released row never unblocks its key in its own run.
How the keys come back: an incremental source's next run widens its extract window back to the
released records (their cursor minus the lookback, or the window of the run that rejected them);
a full refresh reads every key anyway; a files source has no window, so deliver the corrected file
again. That run's load settles each row: 'resolved' when the key loaded, 'retried' when it was
rejected again (the new run has its own open row) or is no longer in the source.
Fix the cause first (the source's data, or the YAML or expectation suite), then release."""


def _filters(parser, *, ids: bool = True) -> None:
    parser.add_argument("--source", required=True, help="source name (include/sources/<source>.yaml)")
    parser.add_argument("--run", help="only rows of this run id")
    parser.add_argument("--stream", help="only rows of this stream")
    parser.add_argument("--rule", help="only rows of this rule (reason code), e.g. map.cast or an expectation")
    if ids:
        parser.add_argument("--id", dest="ids", type=int, nargs="+", metavar="N", help="only these quarantine ids")


def _quarantine_parser(sub) -> None:
    q = sub.add_parser("quarantine", help="rejected rows: list them, read them again, or give them up")
    q_sub = q.add_subparsers(dest="quarantine_command", required=True)
    qlist = q_sub.add_parser("list", help="rows grouped by stage, rule and field (values masked); --rows lists rows")
    qlist.add_argument("--source", help="only this source")
    qlist.add_argument("--run", help="only this run (all statuses unless --status)")
    qlist.add_argument("--stream", help="only this stream")
    qlist.add_argument("--rule", help="only this rule (reason code)")
    qlist.add_argument("--status", choices=_STATUS_CHOICES,
                       help="rows in this state (default: unsettled = open and released; with --run: all)")
    qlist.add_argument("--rows", action="store_true", help="list the rows, newest first, instead of groups")
    qlist.add_argument("--limit", type=int, default=50, help="at most this many rows with --rows (default 50)")
    qlist.add_argument("--json", action="store_true", help="print one JSON document")
    release = q_sub.add_parser("release", help="read the keys again in the source's next run",
                               description=_RELEASE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _filters(release)
    release.add_argument("--by", help="who releases (default: the login name)")
    release.add_argument("--note", help="why (what was fixed)")
    discard = q_sub.add_parser(
        "discard", help="give rows up: they are never retried, and stay on record (status discarded)",
        description="Mark open, released or expired rows discarded, with who and why. Nothing is deleted: the rows "
                    "stay in sync.quarantine (until `purge`) and the action in sync.quarantine_action.")
    _filters(discard)
    discard.add_argument("--all", action="store_true", help="every unsettled row of the source (no other filter)")
    discard.add_argument("--reason", required=True, help="why the rows are given up")
    discard.add_argument("--by", help="who discards (default: the login name)")
    expire = q_sub.add_parser(
        "expire", help="mark rows unsettled for longer than the expiry age expired; prints them",
        description="A key whose oldest open or released row is older than the expiry age (--days, else the "
                    "source YAML's quarantine_expiry_days when declared, else $CRM_SYNC_QUARANTINE_EXPIRY_DAYS, "
                    "else 30) becomes expired. Prints what expired (the final alert's content).")
    expire.add_argument("--source", help="only this source")
    expire.add_argument("--days", type=int, help="expiry age in days")
    expire.add_argument("--json", action="store_true", help="print one JSON document")
    purge = q_sub.add_parser(
        "purge", help="delete settled rows (resolved, retried, discarded, expired) older than N days",
        description="Housekeeping: deletes resolved, retried, discarded and expired rows and superseded versions "
                    "whose last change is older than N days. Open and released rows are never purged; the "
                    "stewards' actions stay in sync.quarantine_action.")
    purge.add_argument("--older-than-days", type=int, required=True, metavar="N")
    purge.add_argument("--source", help="only this source")


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


def _statuses(args) -> list[str] | None:
    status = args.status or ("all" if args.run else "unsettled")
    return {"all": None, "unsettled": ["open", "released"]}.get(status, [status])


def _when(value) -> str:
    return value.isoformat(timespec="seconds") if hasattr(value, "isoformat") else str(value or "")


def _n(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _render_groups(groups: list[dict], with_source: bool) -> list[str]:
    with_status = any("status" in g for g in groups)
    headers = (["SOURCE"] if with_source else []) + ["STREAM", "STAGE", "RULE", "FIELD", "KEYS", "ROWS"] \
        + (["STATUS"] if with_status else []) + ["EXAMPLE"]
    table = [headers]
    for g in groups:
        status = [", ".join(f"{k} {v}" for k, v in g.get("status", {}).items())] if with_status else []
        table.append(([g["source"]] if with_source else []) + [
            g["stream"], g["stage"], g["rule"], g["field"] or "-", str(g["keys"]), str(g["rows"]), *status,
            g["example_value"] if g.get("example_value") not in (None, "") else "-"])
    widths = [max(len(str(row[i])) for row in table) for i in range(len(headers))]
    numeric = {headers.index("KEYS"), headers.index("ROWS")}
    return ["  ".join(str(c).rjust(w) if i in numeric else str(c).ljust(w)
                      for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in table]


def _render_rows(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        value = f" = {r['value']}" if r.get("value") not in (None, "") else ""
        key = repr(r["source_pk"]) if r["source_pk"] is not None else "(no key)"
        lines.append(f"#{r['id']} {r['source']}/{r['stream']} {key} [{r['status']}] {r['stage']} {r['rule']}"
                     f"{' ' + r['field'] if r['field'] else ''}{value}")
        lines.append(f"    run {r['run_id']} at {_when(r['created_at'])}: {r['reason']}")
        if r["status"] != "open":
            by = f" by {r['status_by']}" if r.get("status_by") else ""
            note = f": {r['status_note']}" if r.get("status_note") else ""
            retry = f" (run {r['retry_run_id']})" if r.get("retry_run_id") else ""
            lines.append(f"    {r['status']}{by} at {_when(r['status_at'])}{retry}{note}")
    return lines


def _filter_words(args) -> str:
    words = [f"{name} {value}" for name, value in (("run", getattr(args, "run", None)),
                                                   ("stream", getattr(args, "stream", None)),
                                                   ("rule", getattr(args, "rule", None))) if value]
    if getattr(args, "ids", None):
        words.append("ids " + ", ".join(map(str, args.ids)))
    return f" ({'; '.join(words)})" if words else ""


def _retry_plan(conn, source: str, changed: list[dict]) -> str:
    """How the next run reads the released keys again, in words."""
    from crm_sync import quarantine
    from crm_sync.config import ConfigError, load_source

    dag = f"crm_sync__{source}"
    try:
        cfg = load_source(source)
    except ConfigError:
        return f"The next run of {dag} reads them again."
    if cfg.kind == "files":
        return (f"{source} is a files source: deliver the corrected file to its landing folder again; the run "
                "that loads the keys marks these rows resolved.")
    if cfg.sync_mode == "full":
        return f"{source} is a full refresh: the next run of {dag} reads every key again and settles these rows."
    since = []
    with conn.cursor() as cur:
        for name in sorted({c["stream"] for c in changed}):
            try:
                stream = cfg.stream(name)
            except KeyError:
                continue
            since += list(quarantine._release_bounds(cur, source, stream).values())
    if any(b is quarantine._UNBOUNDED for b in since) or not since:
        where = "reads the stream's whole history"
    else:
        where = f"reads back to {_when(min(since) - cfg.lookback)}"
    return f"The next run of {dag} {where} to get them again, and its load settles these rows."


def _quarantine(conn, args) -> int:
    from crm_sync import quarantine

    command = args.quarantine_command
    try:
        if command == "list":
            statuses = _statuses(args)
            scope = {"source": args.source, "run": args.run, "stream": args.stream, "rule": args.rule,
                     "status": statuses or "all"}
            if args.rows:
                rows = quarantine.list_rows(conn, source=args.source, run_id=args.run, statuses=statuses,
                                            stream=args.stream, rule=args.rule, limit=args.limit)
                if args.json:
                    print(json.dumps({"filter": scope, "rows": rows}, indent=2, ensure_ascii=False, default=str))
                else:
                    print("\n".join(_render_rows(rows)) if rows else f"no quarantined rows{_filter_words(args)}")
                return 0
            groups = quarantine.summary(conn, run_id=args.run, source=args.source, statuses=statuses,
                                        stream=args.stream, rule=args.rule)
            if args.json:
                print(json.dumps({"filter": scope, "groups": groups}, indent=2, ensure_ascii=False, default=str))
                return 0
            what = "/".join(statuses) if statuses else "all"
            where = f"source '{args.source}'" if args.source else "all sources"
            if not groups:
                print(f"no quarantined rows ({what}) in {where}{_filter_words(args)}")
                return 0
            keys = sum(g["keys"] for g in groups)
            print(f"quarantine of {where}{_filter_words(args)}: {_n(keys, 'record')} ({what}) in "
                  f"{_n(len(groups), 'group')}")
            print("\n".join(_render_groups(groups, with_source=not args.source)))
            src = args.source or "SOURCE"
            print(f"\nrows:    crm-sync quarantine list --source {src} --rule RULE --rows"
                  f"\nretry:   crm-sync quarantine release --source {src} --rule RULE   (after fixing the cause)"
                  f"\ngive up: crm-sync quarantine discard --source {src} --rule RULE --reason TEXT")
            return 0
        if command == "release":
            changed = quarantine.release(conn, args.source, run_id=args.run, stream=args.stream, rule=args.rule,
                                         ids=args.ids, by=args.by, note=args.note)
            if not changed:
                print(f"crm-sync quarantine release: no open or expired rows of source '{args.source}' match"
                      f"{_filter_words(args)}", file=sys.stderr)
                return 1
            plan = _retry_plan(conn, args.source, changed)
            conn.commit()
            _print_changed("released", args.source, changed, args)
            print(plan)
            return 0
        if command == "discard":
            if not (args.run or args.stream or args.rule or args.ids or args.all):
                print("crm-sync quarantine discard: say which rows (--run, --stream, --rule or --id), or --all for "
                      f"every unsettled row of source '{args.source}'", file=sys.stderr)
                return 2
            changed = quarantine.discard(conn, args.source, reason=args.reason, run_id=args.run, stream=args.stream,
                                         rule=args.rule, ids=args.ids, by=args.by)
            if not changed:
                print(f"crm-sync quarantine discard: no open, released or expired rows of source '{args.source}' "
                      f"match{_filter_words(args)}", file=sys.stderr)
                return 1
            conn.commit()
            _print_changed("discarded", args.source, changed, args)
            print(f"They are never retried and stay on record (status discarded, by "
                  f"{args.by or quarantine.default_actor()}: {args.reason}) until purged.")
            return 0
        if command == "expire":
            expired = quarantine.expire(conn, source=args.source, days=args.days)
            conn.commit()
            groups = quarantine.group_rows(expired)
            if args.json:
                print(json.dumps({"expired": expired, "groups": groups}, indent=2, ensure_ascii=False, default=str))
            elif not expired:
                print("nothing expired")
            else:
                print(f"expired {_n(len(expired), 'row')} ({_n(sum(g['keys'] for g in groups), 'record')}):")
                print("\n".join(_render_groups(groups, with_source=True)))
            return 0
        if command == "purge":
            deleted = quarantine.purge(conn, args.older_than_days, source=args.source)
            conn.commit()
            print(f"purged {_n(deleted, 'settled quarantine row')} older than {args.older_than_days} days"
                  + (f" of source '{args.source}'" if args.source else ""))
            return 0
    except ValueError as exc:
        conn.rollback()
        print(f"crm-sync quarantine {command}: {exc}", file=sys.stderr)
        return 2
    return 2


def _print_changed(verb: str, source: str, changed: list[dict], args) -> None:
    from crm_sync import quarantine

    groups = quarantine.group_rows(changed)
    print(f"{verb} {_n(len(changed), 'row')} ({_n(sum(g['keys'] for g in groups), 'record')}) of source "
          f"'{source}'{_filter_words(args)}:")
    print("\n".join(_render_groups(groups, with_source=False)))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from crm_sync import db

    try:
        if args.command == "demo":
            from crm_sync.demo import run_demo

            return run_demo(args.scenario)
        if args.command == "status":
            from crm_sync import status

            with db.migrated_connection() as conn:
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
            with db.migrated_connection() as conn:
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

            with db.migrated_connection() as conn:
                try:
                    with conn.cursor() as cur:
                        done = set_override(cur, args.customer_id, args.field, args.value, args.by)
                    conn.commit()
                except (LookupError, ValueError) as exc:
                    print(f"crm-sync: {exc}", file=sys.stderr)
                    return 1
                print(f"customer {done['customer_id']}: {done['field']} = {done['value']} (override)")
                return 0
        if args.command == "quarantine":
            with db.migrated_connection() as conn:
                return _quarantine(conn, args)
        if args.command == "identity":
            import os

            from crm_sync.identity import resolve

            with db.migrated_connection() as conn:
                done = resolve.estimate(conn, args.source, args.sample or resolve.ESTIMATE_SAMPLE,
                                        by=args.by or os.environ.get("USER") or "crm-sync")
            if args.json:
                print(json.dumps(done, indent=2, ensure_ascii=False, default=str))
            else:
                scope = f"source {done['source']}" if done["source"] else "the whole master"
                print(f"match parameters #{done['params_id']} ({done['config']}, {scope}): estimated on "
                      f"{done['sampled']:,} of {done['population']:,} records in {done['seconds']} s; prior "
                      f"{done['params']['prior']:.3g} ({done['matches_per_record']:.2f} other records per record); "
                      + ("the next resolve run of every source uses them" if not done["source"] else
                         f"the next resolve run of source {done['source']} uses them"))
            return 0
        if args.command == "report":
            from crm_sync.quality import report

            with db.migrated_connection() as conn:
                run_id = args.run or report.latest_run(conn, args.source)
                if run_id is None:
                    print(f"crm-sync report: source '{args.source}' has no runs yet", file=sys.stderr)
                    return 1
                built = report.build(conn, run_id, args.source)
                conn.commit()
            print(built.json_path if args.json else built.html_path)
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
