"""Least privilege (issue 9): the owner migrates, the loader runs the pipeline, the reporter reads,
the source simulators' readers cannot write, and a real DAG run never uses a superuser."""
from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timedelta, timezone

import psycopg2
import pytest
from psycopg2 import errors

from crm_sync import db, demo, paths
from crm_sync.config import load_source_file
from crm_sync.simulators import erp, finance, people

SEED = 5


def _login(dsn: str, login: db.Login):
    """A connection as `login` to the database of the administrator's `dsn`."""
    return psycopg2.connect(dsn, user=login.user, password=login.password, application_name="test_roles")


def _fails(conn, statement: str, error: type, message: str, params=()) -> None:
    """`statement` fails with `error` whose text contains `message`; the transaction is rolled back."""
    with pytest.raises(error) as caught:
        with conn.cursor() as cur:
            cur.execute(statement, params)
    conn.rollback()
    assert message in str(caught.value), str(caught.value)


def _database(dsn: str) -> str:
    with db.connection(dsn) as conn, conn.cursor() as cur:
        cur.execute("select current_database()")
        return cur.fetchone()[0]


def _owners(dsn: str) -> dict[str, set[str]]:
    """schema -> owners of its tables, views and sequences (the schema's own owner as 'schema:<name>')."""
    conn = db.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("""select n.nspname, pg_get_userbyid(c.relowner) from pg_class c
                           join pg_namespace n on n.oid = c.relnamespace
                           where n.nspname in ('crm', 'stg', 'sync') and c.relkind in ('r', 'p', 'v', 'm', 'S')
                           union
                           select nspname, 'schema:' || pg_get_userbyid(nspowner) from pg_namespace
                           where nspname in ('crm', 'stg', 'sync')""")
            out: dict[str, set[str]] = {}
            for schema, owner in cur.fetchall():
                out.setdefault(schema, set()).add(owner)
            return out
    finally:
        conn.close()


@pytest.fixture()
def loader(fresh_dsn, role_logins):
    conn = _login(fresh_dsn, role_logins["loader"])
    yield conn
    conn.rollback()
    conn.close()


@pytest.fixture()
def reporter(fresh_dsn, role_logins):
    conn = _login(fresh_dsn, role_logins["reporter"])
    yield conn
    conn.rollback()
    conn.close()


def test_the_migration_declares_the_group_roles_the_helpers_use(conn):
    text = (paths.sql_dir() / "migrations" / "0007_roles.sql").read_text(encoding="utf-8")
    assert "array['crm_owner', 'crm_loader', 'crm_reporter']" in text
    with conn.cursor() as cur:
        cur.execute("select rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb from pg_roles "
                    "where rolname = any(%s) order by rolname", (list(db.GROUP_ROLES),))
        roles = cur.fetchall()
    assert [r[0] for r in roles] == sorted(db.GROUP_ROLES)
    assert all(r[1:] == (False, False, False, False) for r in roles)


def test_the_owner_owns_the_schemas_and_the_loader_the_staging_tables(fresh_dsn):
    owners = _owners(fresh_dsn)
    assert owners["crm"] == {"schema:crm_owner", "crm_owner"}
    assert owners["sync"] == {"schema:crm_owner", "crm_owner"}
    # ANALYZE after a bulk write needs the owner on PostgreSQL 15/16 (MAINTAIN exists from 17 only)
    assert owners["stg"] == {"schema:crm_owner", "crm_loader"}
    with db.connection(fresh_dsn) as conn, conn.cursor() as cur:
        cur.execute("select pg_get_userbyid(datdba) from pg_database where datname = current_database()")
        assert cur.fetchone()[0] == db.OWNER_ROLE


def test_logins_are_no_superusers_and_a_superuser_is_never_made_a_login(conn, role_logins, pg_admin_dsn):
    with conn.cursor() as cur:
        cur.execute("select rolname, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolcanlogin from pg_roles "
                    "where rolname = any(%s)", ([login.user for login in role_logins.values()],))
        rows = cur.fetchall()
        cur.execute("select current_user")
        admin = cur.fetchone()[0]
    assert len(rows) == 2 and all(r[1:] == (False, False, False, False, True) for r in rows)
    assert "***" in repr(role_logins["loader"]) and role_logins["loader"].password not in repr(role_logins["loader"])
    with pytest.raises(db.DatabaseError, match="is a superuser"):
        db.ensure_login(conn, admin, member_of=(db.LOADER_ROLE,))
    conn.rollback()


def test_loader_runs_dml_on_crm_stg_and_sync(loader):
    run_id = f"roles-{uuid.uuid4().hex[:8]}"
    customer = str(uuid.uuid4())
    with loader.cursor() as cur:
        cur.execute("select current_user, rolsuper from pg_roles where rolname = current_user")
        assert cur.fetchone()[1] is False
        cur.execute("insert into crm.customer (customer_id, full_name, first_run_id, last_run_id) "
                    "values (%s, 'Li Na', %s, %s)", (customer, run_id, run_id))
        cur.execute("update crm.customer set city = 'Beijing' where customer_id = %s", (customer,))
        cur.execute("insert into sync.quarantine (run_id, source, stream, stage, reason) "   # a bigserial: sequence USAGE
                    "values (%s, 'erp', 'customers', 'map', 'test') returning quarantine_id", (run_id,))
        assert cur.fetchone()[0] > 0
        cur.execute("insert into stg.extracted (run_id, source, stream, source_pk, payload) "
                    "values (%s, 'erp', 'customers', 'C1', '{}')", (run_id,))
        cur.execute("create temp table probe on commit drop as select * from stg.extracted where run_id = %s", (run_id,))
        cur.execute("delete from crm.customer where customer_id = %s", (customer,))
        assert cur.rowcount == 1
        cur.execute("select count(*) from sync.schema_version")
        assert cur.fetchone()[0] >= 7
    loader.commit()
    # the stages analyze staging tables after bulk writes: as their owner, without a "skipping" warning
    del loader.notices[:]
    with loader.cursor() as cur:
        cur.execute("analyze stg.extracted")
        cur.execute("delete from stg.extracted where run_id = %s", (run_id,))
        cur.execute("delete from sync.quarantine where run_id = %s", (run_id,))
    loader.commit()
    assert not [n for n in loader.notices if "skipping" in n], loader.notices


@pytest.mark.parametrize("statement, message", [
    ("drop table crm.customer", "must be owner of table customer"),
    ("create table crm.intruder (id int)", "permission denied for schema crm"),
    ("create table stg.intruder (id int)", "permission denied for schema stg"),
    ("create table sync.intruder (id int)", "permission denied for schema sync"),
    ("alter table crm.customer add column intruder text", "must be owner of table customer"),
    ("truncate crm.customer", "permission denied for table customer"),
    ("create schema intruder", "permission denied for database"),
    ("insert into sync.schema_version (version, name, checksum) values (9999, 'x', 'x')",
     "permission denied for table schema_version"),
    ("select sync.apply_privileges()", "permission denied for function apply_privileges"),
])
def test_loader_cannot_change_the_schema(loader, statement, message):
    _fails(loader, statement, errors.InsufficientPrivilege, message)


def test_reporter_reads_crm_and_sync_and_cannot_write(reporter):
    with reporter.cursor() as cur:
        cur.execute("select count(*) from crm.customer")
        cur.execute("select count(*) from sync.run_log")
    reporter.rollback()
    _fails(reporter, "insert into crm.customer (customer_id, first_run_id, last_run_id) values (%s, 'r', 'r')",
           errors.InsufficientPrivilege, "permission denied for table customer", (str(uuid.uuid4()),))
    _fails(reporter, "update sync.watermark set run_id = 'x'", errors.InsufficientPrivilege,
           "permission denied for table watermark")
    _fails(reporter, "select count(*) from stg.extracted", errors.InsufficientPrivilege, "permission denied for schema stg")


def test_tables_of_later_migrations_get_the_same_grants(fresh_dsn, loader, reporter):
    """Default privileges: what a later migration creates as crm_owner is usable at once."""
    with db.connection(fresh_dsn) as admin, admin.cursor() as cur:
        cur.execute("set role crm_owner")
        cur.execute("create table crm.later_probe (id int primary key, note text)")
        cur.execute("create table stg.later_probe (id bigserial primary key, note text)")
        admin.commit()
    try:
        with loader.cursor() as cur:
            cur.execute("insert into crm.later_probe values (1, 'a')")
            cur.execute("insert into stg.later_probe (note) values ('a')")
        loader.commit()
        with reporter.cursor() as cur:
            cur.execute("select note from crm.later_probe")
            assert cur.fetchall() == [("a",)]
        reporter.rollback()
        _fails(reporter, "select * from stg.later_probe", errors.InsufficientPrivilege, "permission denied")
    finally:
        with db.connection(fresh_dsn) as admin, admin.cursor() as cur:
            cur.execute("drop table crm.later_probe, stg.later_probe")
            admin.commit()


@pytest.fixture(scope="module")
def source_dbs(pg_admin_dsn):
    """The ERP and finance simulators, each in its own database with its reader: {name: (admin dsn, Login)}."""
    pool = people.generate_people(60, SEED)
    now = datetime.now(timezone.utc)
    made = {}
    try:
        for name, simulator in (("erp", erp), ("finance", finance)):
            database = f"crm_test_{name}_{uuid.uuid4().hex[:8]}"
            db.ensure_database(pg_admin_dsn, database)
            dsn = db.with_database(pg_admin_dsn, database)
            made[name] = (database, dsn, None)
            with db.connection(dsn) as conn:
                simulator.seed(conn, people=pool, seed=SEED, now=now)
                made[name] = (database, dsn, simulator.ensure_reader(conn))
        yield {name: (dsn, reader) for name, (_, dsn, reader) in made.items()}
    finally:
        for database, *_ in made.values():
            db.drop_database(pg_admin_dsn, database)


@pytest.mark.parametrize("source, table, insert, hidden", [
    ("erp", "src_erp.customers", "insert into src_erp.customers (customer_no) values ('X1')", "src_erp.truth"),
    ("finance", "cw.fp", "insert into cw.fp (fphm) values ('X1')", "cw.truth"),
])
def test_source_readers_read_their_tables_and_cannot_write(source_dbs, source, table, insert, hidden):
    dsn, reader = source_dbs[source]
    assert reader.user.endswith("_reader")
    conn = _login(dsn, reader)
    try:
        with conn.cursor() as cur:
            cur.execute(f"select count(*) from {table}")
            assert cur.fetchone()[0] > 0
            cur.execute("select current_setting('default_transaction_read_only'), rolsuper "
                        "from pg_roles where rolname = current_user")
            assert cur.fetchone() == ("on", False)
        conn.rollback()
        # every session is read-only ...
        _fails(conn, insert, errors.ReadOnlySqlTransaction, "cannot execute INSERT in a read-only transaction")
        _fails(conn, f"create temp table scratch as select * from {table}", errors.ReadOnlySqlTransaction,
               "read-only transaction")
        # ... and a session that asks for read-write still has no write grant
        with conn.cursor() as cur:
            cur.execute("set transaction read write")
        _fails(conn, insert, errors.InsufficientPrivilege, "permission denied for table")
        with conn.cursor() as cur:
            cur.execute("set transaction read write")
        _fails(conn, f"create table {table.split('.')[0]}.intruder (id int)", errors.InsufficientPrivilege,
               "permission denied for schema")
        # the simulator's answer key is not the source's data
        _fails(conn, f"select * from {hidden}", errors.InsufficientPrivilege, "permission denied for table truth")
    finally:
        conn.close()


def test_a_database_migrated_before_0007_is_handed_to_the_owner(pg_admin_dsn, monkeypatch):
    """Databases a superuser migrated (the demo's, compose's crm-db) move to the owner role in place."""
    database = f"crm_test_{uuid.uuid4().hex[:10]}"
    db.ensure_database(pg_admin_dsn, database)
    dsn = db.with_database(pg_admin_dsn, database)
    try:
        every = db.migration_files()
        monkeypatch.setattr(db, "migration_files", lambda: [f for f in every if int(f.name[:4]) < 7])
        with db.connection(dsn) as conn:
            db.migrate(conn)   # as the superuser, the way it was done before roles
        monkeypatch.undo()
        assert "crm_owner" not in _owners(dsn)["crm"]
        applied = db.migrate_as_owner(dsn)
        assert "0007_roles.sql" in applied
        owners = _owners(dsn)
        assert owners["crm"] == owners["sync"] == {"schema:crm_owner", "crm_owner"}
        assert owners["stg"] == {"schema:crm_owner", "crm_loader"}
        with db.connection(dsn) as conn:
            login = db.ensure_login(conn, f"{database}_loader", member_of=(db.LOADER_ROLE,))
        loader = _login(dsn, login)
        try:
            with loader.cursor() as cur:
                cur.execute("insert into sync.watermark (source, stream, cursor_value, run_id) "
                            "values ('erp', 'customers', now(), 'r1')")
            loader.rollback()
            _fails(loader, "drop table crm.customer", errors.InsufficientPrivilege, "must be owner")
        finally:
            loader.close()
    finally:
        db.drop_database(pg_admin_dsn, database)


# --- one real DAG run --------------------------------------------------------------------------

class _Sessions(threading.Thread):
    """Watches pg_stat_activity while a DAG runs: who the pipeline's sessions are in `databases`."""

    def __init__(self, admin_dsn: str, databases: list[str]) -> None:
        super().__init__(daemon=True)
        self.admin_dsn, self.databases = admin_dsn, databases
        self.seen: set[tuple[str, str, bool]] = set()
        self.done = threading.Event()

    def run(self) -> None:
        conn = db.connect(self.admin_dsn)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                while not self.done.wait(0.05):
                    cur.execute("""select a.datname, a.usename, r.rolsuper from pg_stat_activity a
                                   join pg_roles r on r.oid = a.usesysid
                                   where a.datname = any(%s) and a.pid <> pg_backend_pid()
                                     and a.application_name <> 'test_roles'""", (self.databases,))
                    self.seen.update(cur.fetchall())
        finally:
            conn.close()


@pytest.mark.integration
def test_an_erp_dag_run_as_the_loader_role(fresh_dsn, pg_admin_dsn, tmp_path, monkeypatch):
    from crm_sync.simulators.smtp_outbox import OutboxServer
    from dagstack import DagStack, airflow_env, copy_include

    include = copy_include(tmp_path, fast_http=())
    cfg = load_source_file(include / "sources" / "erp.yaml")
    now = datetime.now(timezone.utc)
    end = demo.interval_end(cfg, now)
    erp_db = f"crm_test_erp_{uuid.uuid4().hex[:8]}"
    db.ensure_database(pg_admin_dsn, erp_db)
    erp_dsn = db.with_database(pg_admin_dsn, erp_db)
    try:
        with db.connection(erp_dsn) as conn:
            seeded = erp.seed(conn, people=people.generate_people(150, SEED), seed=SEED, now=end - timedelta(minutes=5))
        with OutboxServer(tmp_path / "outbox") as smtp:
            connections = {
                "crm_db": db.airflow_conn_json(fresh_dsn),
                "erp_src": db.airflow_conn_json(erp_dsn),
                "smtp_alerts": json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": smtp.port,
                                           "extra": {"disable_ssl": True, "disable_tls": True, "timeout": 10,
                                                     "retry_limit": 1, "from_email": "crm-sync@localhost"}}),
            }
            env = airflow_env(connections, include)
            stack = DagStack(tmp=tmp_path, configs={"erp": cfg}, now=now, dsn=fresh_dsn, env=env)
            crm_db = _database(fresh_dsn)
            watcher = _Sessions(pg_admin_dsn, [crm_db, erp_db])
            watcher.start()
            try:
                code = stack.run("erp")
            finally:
                watcher.done.set()
                watcher.join(10)
        assert code == 0, stack.last_log.read_text()[-4000:]
        assert stack.last_run("erp")["state"] == "success"
        assert stack.one("select count(*) from crm.source_customer where source = 'erp'") == seeded.customers

        # the connections the tasks use, opened the way the tasks open them
        for conn_id, role in (("crm_db", db.LOADER_ROLE), ("erp_src", None)):
            monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", env[f"AIRFLOW_CONN_{conn_id.upper()}"])
            conn = db.task_connection(conn_id)
            try:
                with conn.cursor() as cur:
                    cur.execute("select current_user, rolsuper from pg_roles where rolname = current_user")
                    user, superuser = cur.fetchone()
                    assert superuser is False, (conn_id, user)
                    if role:
                        cur.execute("select pg_has_role(current_user, %s, 'member')", (role,))
                        assert cur.fetchone()[0], (conn_id, user)
                    else:
                        assert user == f"{erp_db}_reader"
            finally:
                conn.close()
        # and every session of the run that pg_stat_activity showed (polled every 50 ms)
        seen = {(d, u) for d, u, _ in watcher.seen}
        assert (crm_db, f"{crm_db}_loader") in seen
        assert seen <= {(crm_db, f"{crm_db}_loader"), (erp_db, f"{erp_db}_reader")}, seen
        assert not any(superuser for *_, superuser in watcher.seen)
    finally:
        db.drop_database(pg_admin_dsn, erp_db)


def test_the_cli_migrates_a_new_database_as_the_owner_role(pg_admin_dsn, monkeypatch, capsys):
    """`crm-sync status` (or review, override, quarantine, identity, report) on a database nobody has
    migrated: its objects belong to crm_owner, as after the demo's migration, not to whoever ran it."""
    from crm_sync import cli

    database = f"crm_test_{uuid.uuid4().hex[:10]}"
    db.ensure_database(pg_admin_dsn, database)
    dsn = db.with_database(pg_admin_dsn, database)
    try:
        monkeypatch.setenv("CRM_SYNC_DSN", dsn)
        assert cli.main(["status", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)
        owners = _owners(dsn)
        assert owners["crm"] == owners["sync"] == {"schema:crm_owner", "crm_owner"}
        assert owners["stg"] == {"schema:crm_owner", "crm_loader"}
    finally:
        db.drop_database(pg_admin_dsn, database)


def test_the_loader_analyzes_the_crm_tables_a_load_grew_and_leaves_the_rest(loader, reporter):
    from crm_sync import staging

    with loader.cursor() as cur:
        cur.execute("insert into crm.match_key (key, source, source_id)"
                    " select 'b:test=' || i % 97, 'stats', i::text from generate_series(1, 5000) i")
        loader.commit()
        analysed = staging.analyze_grown(cur)
        loader.commit()
        assert "match_key" in analysed
        cur.execute("select reltuples from pg_class where oid = 'crm.match_key'::regclass")
        assert cur.fetchone()[0] >= 5000   # planned as the rows it holds, not as an empty table
        assert "match_key" not in staging.analyze_grown(cur)   # not grown since
        cur.execute("insert into crm.match_key (key, source, source_id)"
                    " select 'b:test=1', 'stats', 'x' || i from generate_series(1, 100) i")
        assert "match_key" not in staging.analyze_grown(cur)   # 2 % is no reason
        loader.rollback()
    _fails(reporter, "select sync.analyze_grown()", errors.InsufficientPrivilege, "permission denied for function")


def test_a_staging_analyze_samples_little_and_leaves_the_session_setting(loader):
    from crm_sync import staging

    with loader.cursor() as cur:
        cur.execute("set default_statistics_target = 150")
        cur.execute("insert into stg.extracted (run_id, source, stream, source_pk, payload)"
                    " select 'stats_' || (i % 2), 'stats', 's', i::text, '{}' from generate_series(1, 20000) i")
        staging.analyze(cur, "stg.extracted")
        cur.execute("show default_statistics_target")
        assert cur.fetchone()[0] == "150"
        cur.execute("select most_common_vals::text from pg_stats"
                    " where schemaname = 'stg' and tablename = 'extracted' and attname = 'run_id'")
        common = cur.fetchone()[0].strip("{}").split(",")
        assert {"stats_0", "stats_1"} <= set(common)
        cur.execute("explain select * from stg.extracted where run_id = 'stats_1'")
        estimated = int(cur.fetchone()[0].split("rows=")[1].split()[0])
        assert 8_000 <= estimated <= 12_000
    loader.rollback()
