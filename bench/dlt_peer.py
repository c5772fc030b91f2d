"""The peer of crm-sync's load stage: dlt merging the same mapped rows into PostgreSQL.

Run by `bench_pipeline.py` in a virtualenv of its own (`bench/requirements-dlt.txt`: dlt's pins
do not fit beside Airflow's), never imported by crm-sync:

    python bench/dlt_peer.py --source-dsn DSN --dest-dsn DSN --first RUN_ID --change RUN_ID \
        --formats csv,insert_values

For each loader file format, into a fresh dataset of the destination database:
- first load: the rows `stg.mapped_customer` and `stg.mapped_order` hold for run `--first`
  (crm-sync's nightly run), `write_disposition="merge"` on `(source, source_pk)`;
- change: the rows of run `--change` (the hourly run: 1 % of the customers and their orders)
  merged into that dataset.
The rows are read from the CRM's staging tables through a server-side cursor in chunks of
10,000 (dicts, as a dlt resource yields them; `run_id` left out, it differs per run).
Prints one JSON object: per format, per step, `rows`, `seconds` (whole `pipeline.run`) and
`load_s` (dlt's load step alone, from the pipeline's trace).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import dlt
import psycopg2

TABLES = {"customer": "stg.mapped_customer", "order": "stg.mapped_order"}
CHUNK = 10_000


def rows(source_dsn: str, table: str, run_id: str):
    conn = psycopg2.connect(source_dsn, application_name="crm-sync-bench-dlt")
    try:
        with conn.cursor(name="peer") as cur:
            cur.itersize = CHUNK
            cur.execute(f"select * from {table} where run_id = %s", (run_id,))
            names = None
            while True:
                chunk = cur.fetchmany(CHUNK)
                if not chunk:
                    break
                names = names or [d[0] for d in cur.description]
                yield [{k: v for k, v in zip(names, row) if k != "run_id"} for row in chunk]
    finally:
        conn.close()


def resources(source_dsn: str, run_id: str):
    return [dlt.resource(rows(source_dsn, table, run_id), name=f"mapped_{entity}", write_disposition="merge",
                         primary_key=("source", "source_pk"))
            for entity, table in TABLES.items()]


def count(source_dsn: str, run_id: str) -> int:
    conn = psycopg2.connect(source_dsn)
    try:
        with conn.cursor() as cur:
            return sum(_one(cur, f"select count(*) from {t} where run_id = %s", run_id) for t in TABLES.values())
    finally:
        conn.close()


def _one(cur, query: str, arg) -> int:
    cur.execute(query, (arg,))
    return cur.fetchone()[0]


def with_password(dsn: str) -> str:
    """dlt insists on a password; a server that trusts local connections ignores this one."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    if parts.password is not None or "@" not in parts.netloc:
        return dsn
    user, host = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{user}:unused@{host}"))


def step_seconds(trace, name: str) -> float | None:
    for step in trace.steps:
        if step.step == name and step.finished_at and step.started_at:
            return round((step.finished_at - step.started_at).total_seconds(), 2)
    return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source-dsn", required=True)
    parser.add_argument("--dest-dsn", required=True)
    parser.add_argument("--first", required=True, help="run id of the first load's rows")
    parser.add_argument("--change", required=True, help="run id of the change's rows")
    parser.add_argument("--formats", default="csv,insert_values")
    args = parser.parse_args()
    out: dict = {"dlt_version": dlt.__version__}
    for fmt in args.formats.split(","):
        with tempfile.TemporaryDirectory(prefix="crm-bench-dlt-") as pipelines_dir:
            pipeline = dlt.pipeline(pipeline_name=f"peer_{fmt}", pipelines_dir=pipelines_dir,
                                    destination=dlt.destinations.postgres(credentials=with_password(args.dest_dsn)),
                                    dataset_name=f"peer_{fmt}")
            figures = {}
            for step, run_id in (("first_load", args.first), ("change", args.change)):
                t0 = time.perf_counter()
                pipeline.run(resources(args.source_dsn, run_id), loader_file_format=fmt)
                seconds = time.perf_counter() - t0
                figures[step] = {"rows": count(args.source_dsn, run_id), "seconds": round(seconds, 2),
                                 "load_s": step_seconds(pipeline.last_trace, "load")}
            out[fmt] = figures
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
