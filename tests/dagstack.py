"""What the integration modules share: real `airflow dags test` runs against a module's stack.

The pipeline of a stack never runs as a superuser: `airflow_env` swaps each PostgreSQL connection
it is given (an administrator's, as the fixtures make them) for a least-privileged login of that
database: the CRM connection for a member of `crm_loader`, a SQL source's connection for the
source simulator's read-only reader. A superuser connection it cannot swap is refused.
"""
from __future__ import annotations

import importlib
import json
import shutil
import uuid
from datetime import datetime
from pathlib import Path

import yaml

from crm_sync import db, demo

ROOT = Path(__file__).resolve().parents[1]


class DagStack:
    """The module's sample sources, CRM database and Airflow environment; attributes given as keywords."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def run(self, source: str, logical_date: datetime | None = None) -> int:
        cfg = self.configs[source]
        log = self.tmp / f"{cfg.dag_id}-{uuid.uuid4().hex[:6]}.log"
        code = demo.run_dag(cfg.dag_id, logical_date or self.now, self.env, log)
        self.last_log = log
        return code

    def crm(self, sql: str, params=()):
        conn = db.connect(self.dsn)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            conn.close()

    def one(self, sql: str, params=()):
        return self.crm(sql, params)[0][0]

    def last_run(self, source: str) -> dict:
        """The source's newest `sync.run_log` row as a dict."""
        conn = db.connect(self.dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("select * from sync.run_log where source = %s order by started_at desc limit 1", (source,))
                return dict(zip([d[0] for d in cur.description], cur.fetchone()))
        finally:
            conn.close()


def copy_include(tmp: Path, fast_http: tuple[str, ...]) -> Path:
    """A copy of `include/` whose HTTP sources in `fast_http` retry in seconds, not minutes (config is data)."""
    include = tmp / "include"
    shutil.copytree(ROOT / "include", include)
    for name in fast_http:
        path = include / "sources" / f"{name}.yaml"
        doc = yaml.safe_load(path.read_text())
        doc["http"].update({"max_attempts": 3, "backoff_seconds": 0.05, "timeout_seconds": 5})
        path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))
    return include


def _postgres(doc: dict):
    """A psycopg2 connection from an Airflow connection document (JSON form)."""
    import psycopg2

    params = {"host": doc.get("host"), "port": doc.get("port"), "user": doc.get("login"),
              "password": doc.get("password"), "dbname": doc.get("schema")}
    return psycopg2.connect(**{k: v for k, v in params.items() if v not in (None, "")})


def least_privilege(connections: dict[str, str], include: Path) -> dict[str, str]:
    """`connections` with every superuser PostgreSQL connection swapped for the login the pipeline should use.

    The CRM connection (`crm_conn_id` of the source YAMLs) becomes `<database>_loader`, a member of
    `crm_loader`; the connection of a `kind: sql` source becomes the reader its simulator creates
    (`crm_sync.simulators.<source>.ensure_reader`). Passwords are generated per call.
    """
    crm_ids, sql_sources = set(), {}
    for path in sorted((include / "sources").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        crm_ids.add(cfg.get("crm_conn_id", "crm_db"))
        if cfg.get("kind") == "sql":
            sql_sources[cfg["conn_id"]] = cfg["source"]
    swapped = dict(connections)
    for conn_id, value in connections.items():
        if not value.lstrip().startswith("{"):
            continue
        doc = json.loads(value)
        if doc.get("conn_type") not in ("postgres", "postgresql"):
            continue
        conn = _postgres(doc)
        try:
            with conn.cursor() as cur:
                cur.execute("select rolsuper, current_database() from pg_roles where rolname = current_user")
                superuser, database = cur.fetchone()
            conn.rollback()
            if not superuser:
                continue  # already a least-privileged login
            if conn_id in crm_ids:
                login = db.ensure_login(conn, f"{database}_loader", member_of=(db.LOADER_ROLE,))
            elif conn_id in sql_sources:
                simulator = importlib.import_module(f"crm_sync.simulators.{sql_sources[conn_id]}")
                login = simulator.ensure_reader(conn)
            else:
                raise AssertionError(f"connection {conn_id!r} is a superuser's and no least-privileged login "
                                     "is known for it; the pipeline must not run as a superuser")
        finally:
            conn.close()
        swapped[conn_id] = json.dumps({**doc, "login": login.user, "password": login.password})
    return swapped


def airflow_env(connections: dict[str, str], include: Path) -> dict[str, str]:
    """The child Airflow processes' environment: the tests' own metadata DB and the copied include/.

    PostgreSQL connections are swapped for least-privileged logins (`least_privilege`).
    """
    env = demo.airflow_env(least_privilege(connections, include), extra={
        "AIRFLOW_HOME": str(ROOT / ".local" / "airflow-test"),
        "CRM_SYNC_INCLUDE_DIR": str(include),
        "CRM_SYNC_RETRY_DELAY_SECONDS": "1",
    })
    demo.ensure_airflow_db(env)
    return env


def drop_orphan_logins(admin_dsn: str) -> None:
    """Drop the tests' login roles (`crm_test_<...>_<role>`) whose database no longer exists."""
    import psycopg2
    from psycopg2 import sql

    conn = db.connect(admin_dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(r"""select r.rolname from pg_roles r
                            where r.rolcanlogin and not r.rolsuper and r.rolname like 'crm\_test\_%'
                              and not exists (select from pg_database d
                                              where r.rolname like replace(d.datname, '_', '\_') || '\_%')""")
            for (role,) in cur.fetchall():
                try:
                    cur.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(role)))
                except psycopg2.Error:
                    pass  # dropped meanwhile by another session; a later module tries again otherwise
    finally:
        conn.close()
