"""Fixtures of the fault suite: one isolated world per case, and the suite's one-line summary.

Each case (`case` fixture) gets its own CRM database and its own copy of each source database it
uses (both `CREATE DATABASE … TEMPLATE` of a migrated / seeded template made once per session,
so a case costs a fraction of a second to set up), its own copy of `include/sources/` (a case may
patch a source YAML: config is data), the Airflow connections as `AIRFLOW_CONN_*` variables, and
a capture of the e-mails the pipeline would send. The pipeline connects as production does: the
CRM as a member of `crm_loader`, a source database as its simulator's read-only reader; the test
itself breaks things with the administrator's connection. API sources run on loopback simulators,
optionally behind an `HttpFront`; a SQL source may be routed through a `TcpProxy`.

Cases report their figures through `fault_counts(account)`; `pytest_terminal_summary` prints
`fault suite: N cases, lost L, duplicated D` over the cases that reported (a case that fails
before it accounts is not among the N: it has no figures; pytest's own summary lists it).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import uuid
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from faults.harness import END


def _query(dsn: str, sql: str, params=()) -> list[tuple]:
    """Run one statement in its own committed transaction; its rows (none for a statement without)."""
    from crm_sync import db

    conn = db.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            rows = cur.fetchall() if cur.description else []
        conn.commit()
        return rows
    finally:
        conn.close()

ROOT = Path(__file__).resolve().parents[2]
SEED = 11
PEOPLE = {"erp": 80, "finance": 300}  # finance keys companies: ~1 in 12 people works for one, 30% are customers
FAST_HTTP = {"max_attempts": 3, "backoff_seconds": 0.05, "timeout_seconds": 5}

_COUNTS = pytest.StashKey[dict]()


# --- the summary line ---------------------------------------------------------------------------

def pytest_configure(config) -> None:
    config.stash[_COUNTS] = {}


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    counts = config.stash.get(_COUNTS, {})
    if counts:
        lost = sum(c["lost"] for c in counts.values())
        duplicated = sum(c["duplicated"] for c in counts.values())
        terminalreporter.write_line(f"fault suite: {len(counts)} cases, lost {lost}, duplicated {duplicated}")


@pytest.fixture()
def fault_counts(request):
    """Record the case's figures (an `harness.Account`) for the summary line; the last call counts."""
    def record(account) -> None:
        request.config.stash[_COUNTS][request.node.nodeid] = {"lost": account.lost, "duplicated": account.duplicated}

    return record


# --- session templates ----------------------------------------------------------------------------

@contextlib.contextmanager
def _include(path: Path):
    old = os.environ.get("CRM_SYNC_INCLUDE_DIR")
    os.environ["CRM_SYNC_INCLUDE_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CRM_SYNC_INCLUDE_DIR", None)
        else:
            os.environ["CRM_SYNC_INCLUDE_DIR"] = old


@pytest.fixture(scope="session")
def fault_include(tmp_path_factory) -> Path:
    """One copy of `include/` for the session (others may edit the checkout meanwhile); HTTP retries in ms."""
    include = tmp_path_factory.mktemp("fault-include") / "include"
    shutil.copytree(ROOT / "include", include)
    for path in (include / "sources").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        if doc.get("kind") == "http":
            doc.setdefault("http", {}).update(FAST_HTTP)
            path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return include


@pytest.fixture(scope="session")
def templates(pg_admin_dsn, fault_include):
    """Template databases, made on first use: 'crm' (migrated), 'erp' and 'finance' (seeded, ends before END)."""
    from crm_sync import db
    from crm_sync.simulators import erp, finance, people

    made: dict[str, str] = {}
    tag = uuid.uuid4().hex[:8]

    def get(kind: str) -> str:
        if kind not in made:
            name = f"faults_tpl_{kind}_{tag}"
            db.ensure_database(pg_admin_dsn, name)
            conn = db.connect(db.with_database(pg_admin_dsn, name))
            try:
                if kind == "crm":
                    with _include(fault_include):
                        db.migrate_as_owner(db.with_database(pg_admin_dsn, name))
                else:
                    pool = people.generate_people(PEOPLE[kind], SEED)
                    {"erp": erp, "finance": finance}[kind].seed(conn, people=pool, seed=SEED,
                                                                now=END - timedelta(minutes=5))
            finally:
                conn.close()
            made[kind] = name
        return made[kind]

    yield get
    for name in made.values():
        db.drop_database(pg_admin_dsn, name)


# --- one case -------------------------------------------------------------------------------------

class SqlSource:
    """A case's copy of a source database."""

    def __init__(self, name: str, dsn: str, login) -> None:
        self.name, self.dsn = name, dsn   # the administrator's DSN: what the test itself does to the source
        self.login = login                # the simulator's read-only reader: what the pipeline connects as

    def conn(self):
        from crm_sync import db

        return db.connect(self.dsn)

    def execute(self, sql: str, params=()) -> list[tuple]:
        return _query(self.dsn, sql, params)


class Case:
    def __init__(self, admin_dsn: str, include: Path, templates, monkeypatch, stack: contextlib.ExitStack) -> None:
        from crm_sync import db

        self.admin_dsn, self.include, self.templates = admin_dsn, include, templates
        self.monkeypatch, self.stack = monkeypatch, stack
        self.databases: list[str] = []
        self.logins: list[str] = []
        self.alerts: list[tuple[str, str]] = []
        self.sources: dict[str, SqlSource] = {}
        self.crm_dsn = self._copy("crm")  # the administrator's: what the test itself does to the CRM
        monkeypatch.setenv("CRM_SYNC_INCLUDE_DIR", str(include))
        # the pipeline runs as it does in production: a member of crm_loader, never a superuser
        admin = db.connect(self.crm_dsn)
        try:
            loader = db.ensure_login(admin, f"{self.databases[-1]}_loader", member_of=(db.LOADER_ROLE,))
        finally:
            admin.close()
        self.logins.append(loader.user)
        monkeypatch.setenv("AIRFLOW_CONN_CRM_DB", self._conn_json(self.crm_dsn, loader))
        monkeypatch.setattr("crm_sync.alerts._send", lambda subject, body, **kw: self.alerts.append((subject, body)))

    @staticmethod
    def _conn_json(dsn: str, login, host: str | None = None, port: int | None = None) -> str:
        from crm_sync import db

        doc = json.loads(db.airflow_conn_json(dsn))
        doc.update(login=login.user, password=login.password)
        if host is not None:
            doc.update(host=host, port=port)
        return json.dumps(doc)

    def _reader(self, source: str, dsn: str):
        """The source simulator's read-only login of the case's copy (`ensure_reader`)."""
        import importlib

        from crm_sync import db

        admin = db.connect(dsn)
        try:
            login = importlib.import_module(f"crm_sync.simulators.{source}").ensure_reader(admin)
        finally:
            admin.close()
        self.logins.append(login.user)
        return login

    def _copy(self, kind: str) -> str:
        from crm_sync import db

        name = f"faults_{kind}_{uuid.uuid4().hex[:10]}"
        db.copy_database(self.admin_dsn, name, self.templates(kind))
        self.databases.append(name)
        return db.with_database(self.admin_dsn, name)

    # --- sources ---

    def config(self, source: str):
        from crm_sync.config import load_source

        return load_source(source)

    def sql_source(self, source: str) -> SqlSource:
        """The case's own copy of the seeded source database, wired to the source's Airflow connection."""
        from crm_sync import db

        if source not in self.sources:
            dsn = self._copy(source)
            self.sources[source] = SqlSource(source, dsn, self._reader(source, dsn))
            self.monkeypatch.setenv(f"AIRFLOW_CONN_{self.config(source).conn_id.upper()}",
                                    self._conn_json(dsn, self.sources[source].login))
        return self.sources[source]

    def proxied(self, source: str):
        """Route the source's Airflow connection through a `TcpProxy` (returned) to its database."""
        from faults.proxy import TcpProxy

        src = self.sql_source(source)
        parsed = urlparse(src.dsn)
        host = parse_qs(parsed.query).get("host", [parsed.hostname or "localhost"])[0]
        port = parsed.port or int(parse_qs(parsed.query).get("port", ["5432"])[0])
        upstream = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)
        proxy = self.stack.enter_context(TcpProxy(upstream))
        self.monkeypatch.setenv(f"AIRFLOW_CONN_{self.config(source).conn_id.upper()}",
                                self._conn_json(src.dsn, src.login, host="127.0.0.1", port=proxy.port))
        return proxy

    def ticketing(self, *, front: bool = False, people: int = 60, seed: int = SEED):
        """The ticketing API simulator (store generated to end before END), optionally behind an `HttpFront`."""
        from urllib.parse import urlsplit

        from crm_sync.simulators.people import generate_people
        from crm_sync.simulators.ticketing import TicketingServer, TicketingStore
        from faults.proxy import HttpFront

        token = secrets.token_urlsafe(12)
        store = TicketingStore.generate(generate_people(people, seed), seed=seed, now=END - timedelta(minutes=5))
        server = self.stack.enter_context(TicketingServer(store, token))
        server.token, server.front = token, None
        url = server.base_url
        if front:
            server.front = self.stack.enter_context(HttpFront(server.base_url))
            url = server.front.base_url
        parts = urlsplit(url)
        self.monkeypatch.setenv("AIRFLOW_CONN_TICKETING_API", json.dumps(
            {"conn_type": "http", "host": parts.hostname, "port": parts.port, "schema": "http", "password": token}))
        return server

    def patch_source(self, source: str, **changes) -> None:
        """Change the case's copy of a source YAML (nested dicts are merged)."""
        path = self.include / "sources" / f"{source}.yaml"
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))

        def merge(into: dict, new: dict) -> None:
            for k, v in new.items():
                if isinstance(v, dict) and isinstance(into.get(k), dict):
                    merge(into[k], v)
                else:
                    into[k] = v

        merge(doc, changes)
        path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")

    # --- the CRM ---

    def crm(self, sql: str, params=()) -> list[tuple]:
        return _query(self.crm_dsn, sql, params)

    def run_log(self, run_id: str, source: str) -> dict:
        from crm_sync import db

        conn = db.connect(self.crm_dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("select * from sync.run_log where run_id = %s and source = %s", (run_id, source))
                row = cur.fetchone()
                return dict(zip([d[0] for d in cur.description], row)) if row else {}
        finally:
            conn.close()

    def pipeline(self, source: str):
        from faults.harness import Pipeline

        return Pipeline(source)

    def snapshot(self, source: str) -> dict:
        from crm_sync import db
        from faults.harness import snapshot

        conn = db.connect(self.crm_dsn)
        try:
            return snapshot(conn, self.config(source))
        finally:
            conn.close()

    def account(self, source: str, windows, *, rows=None, snapshots=None):
        """`harness.account` for the source: rows read from its database unless given (API stores)."""
        from crm_sync import db
        from faults.harness import account, sql_rows

        cfg = self.config(source)
        if rows is None:
            src = self.sources[source].conn()
            try:
                rows = sql_rows(src, cfg)
            finally:
                src.close()
        conn = db.connect(self.crm_dsn)
        try:
            return account(conn, cfg, rows, windows, snapshots=snapshots)
        finally:
            conn.close()

    def close(self) -> None:
        from crm_sync import db

        from psycopg2 import sql

        self.stack.close()
        for name in self.databases:
            db.drop_database(self.admin_dsn, name)
        admin = db.connect(self.admin_dsn)
        try:
            admin.autocommit = True
            with admin.cursor() as cur:
                for user in self.logins:
                    cur.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(user)))
        finally:
            admin.close()


@pytest.fixture()
def case(pg_admin_dsn, fault_include, templates, monkeypatch, tmp_path):
    include = tmp_path / "include"
    include.mkdir()
    for item in fault_include.iterdir():
        if item.name == "sources":
            shutil.copytree(item, include / "sources")
        else:
            (include / item.name).symlink_to(item)
    c = Case(pg_admin_dsn, include, templates, monkeypatch, contextlib.ExitStack())
    try:
        yield c
    finally:
        c.close()
