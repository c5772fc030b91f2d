"""End to end through real Airflow runs (`airflow dags test`), real PostgreSQL, real GX and real HTTP.

One module-wide stack: a fresh CRM database, the ERP sample source in its own database, the
ticketing API simulator and an SMTP outbox on loopback. The tests run in file order and build on
each other like a day of operations: first loads, a rerun, rate limits, flaky 5xx, a bad batch,
an API outage.
"""
from __future__ import annotations

import email
import email.policy
import html
import json
import re
import secrets
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from crm_sync import db, demo
from crm_sync.config import load_source_file
from crm_sync.simulators import erp, people
from crm_sync.simulators.smtp_outbox import OutboxServer
from crm_sync.simulators.ticketing import Faults, TicketingServer, TicketingStore
from dagstack import DagStack, airflow_env, copy_include

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
SEED = 7


class Stack(DagStack):
    def snapshot(self) -> dict:
        return {
            "customers": self.crm("select customer_id, full_name, phone_e164, email, merged_into from crm.customer "
                                  "order by customer_id"),
            "links": self.crm("select source, source_id, customer_id from crm.customer_link order by 1, 2"),
            "source_rows": self.crm("select source, source_id, row_hash, loaded_run_id from crm.source_customer "
                                    "order by 1, 2"),
            "orders": self.crm("select order_id, amount, row_hash, loaded_run_id from crm.sales_order order by 1"),
            "tickets": self.crm("select ticket_id, status, loaded_run_id from crm.ticket order by 1"),
            "watermarks": self.crm("select source, stream, cursor_value, cursor_pk from sync.watermark order by 1, 2"),
        }

    def mails(self) -> list[Path]:
        return sorted(self.outbox.glob("*.eml"))


@pytest.fixture(scope="module")
def stack(fresh_dsn, pg_admin_dsn, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    # config is data: the same YAMLs, with the HTTP client's backoff shortened so retries take seconds
    include = copy_include(tmp, fast_http=("ticketing",))
    configs = {name: load_source_file(include / "sources" / f"{name}.yaml") for name in ("erp", "ticketing")}

    now = datetime.now(timezone.utc)
    ends = {name: demo.interval_end(cfg, now) for name, cfg in configs.items()}
    erp_db = f"crm_test_erp_{uuid.uuid4().hex[:8]}"
    db.ensure_database(pg_admin_dsn, erp_db)
    erp_dsn = db.with_database(pg_admin_dsn, erp_db)
    pool = people.generate_people(300, SEED)
    conn = db.connect(erp_dsn)
    erp.seed(conn, people=pool, seed=SEED, now=ends["erp"] - timedelta(minutes=5))
    conn.close()
    store = TicketingStore.generate(pool, seed=SEED, now=ends["ticketing"] - timedelta(minutes=5))
    token = secrets.token_urlsafe(16)
    outbox = tmp / "outbox"
    with TicketingServer(store, token=token, faults=Faults(rate_limit_every=4)) as api, OutboxServer(outbox) as smtp:
        connections = {
            "crm_db": db.airflow_conn_json(fresh_dsn),
            "erp_src": db.airflow_conn_json(erp_dsn),
            "ticketing_api": json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": api.port,
                                         "schema": "http", "password": token}),
            "smtp_alerts": json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": smtp.port,
                                       "extra": {"disable_ssl": True, "disable_tls": True, "timeout": 10,
                                                 "retry_limit": 1, "from_email": "crm-sync@localhost"}}),
        }
        env = airflow_env(connections, include)
        yield Stack(tmp=tmp, configs=configs, now=now, ends=ends, dsn=fresh_dsn, erp_dsn=erp_dsn, store=store,
                    api=api, outbox=outbox, env=env, token=token)
    db.drop_database(pg_admin_dsn, erp_db)


def _src(stack, sql):
    conn = db.connect(stack.erp_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


def test_airflow_reports_no_import_errors(stack):
    import subprocess

    proc = subprocess.run([demo._airflow_bin(), "dags", "list-import-errors", "--output", "json"], env=stack.env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert out in ("[]", "No data found"), proc.stdout[-2000:]
    pools = subprocess.run([demo._airflow_bin(), "pools", "get", "ticketing_api", "--output", "json"], env=stack.env,
                           capture_output=True, text=True, timeout=300)
    assert pools.returncode == 0, pools.stderr[-2000:]
    pool = json.loads(pools.stdout.strip().splitlines()[-1])[0]
    assert (pool["pool"], str(pool["slots"])) == ("ticketing_api", "1")


def test_erp_run_loads_customers_and_orders_with_exact_sums(stack):
    assert stack.run("erp") == 0, stack.last_log.read_text()[-4000:]
    run = stack.last_run("erp")
    assert run["state"] == "success"
    customers = _src(stack, "select count(*) from src_erp.customers")[0][0]
    orders, total = _src(stack, "select count(*), sum(amount) from src_erp.orders")[0]
    assert stack.one("select count(*) from crm.source_customer where source = 'erp'") == customers
    assert stack.one("select count(*) from crm.customer_link where source = 'erp'") == customers
    assert stack.one("select count(*) from crm.sales_order where source = 'erp'") == orders
    assert stack.one("select sum(amount) from crm.sales_order where source = 'erp'") == total
    assert isinstance(total, Decimal)
    checks = stack.crm("select stream, check_name, ok from sync.reconciliation where run_id = %s", (run["run_id"],))
    assert {(s, c) for s, c, _ in checks} >= {("customers", "row_count"), ("orders", "amount_sum")}
    assert all(ok for _, _, ok in checks)
    # in-source duplicates (one person, two customer numbers with the same mobile) share one customer
    assert stack.one("select count(distinct customer_id) from crm.customer_link where source = 'erp'") < customers


def test_rerun_of_the_same_interval_changes_nothing(stack):
    before = stack.snapshot()
    assert stack.run("erp") == 0, stack.last_log.read_text()[-4000:]
    assert stack.snapshot() == before


def test_ticketing_survives_rate_limits_and_merges_across_sources(stack):
    stack.api.reset()
    stack.api.set_faults(rate_limit_every=4)
    assert stack.run("ticketing") == 0, stack.last_log.read_text()[-4000:]
    stats = stack.api.stats()
    statuses = {s for per in stats["by_endpoint"].values() for s in per}
    assert "429" in statuses or 429 in statuses
    run = stack.last_run("ticketing")
    assert run["state"] == "success"
    assert stack.one("select count(*) from crm.source_customer where source = 'ticketing'") == len(stack.store.users)
    assert stack.one("select api_calls from sync.run_log where run_id = %s and source = 'ticketing'",
                     (run["run_id"],)) == stats["calls"]
    both = stack.one("""select count(*) from crm.customer c
                        where exists (select 1 from crm.customer_link l where l.customer_id = c.customer_id and l.source = 'erp')
                          and exists (select 1 from crm.customer_link l where l.customer_id = c.customer_id and l.source = 'ticketing')""")
    assert both > 0


def test_incremental_run_picks_up_changes_and_retries_5xx(stack):
    marks_before = dict(((s, st), v) for s, st, v, _ in stack.snapshot()["watermarks"])
    changed = stack.store.apply_changes(seed=SEED + 1, now=stack.ends["ticketing"] - timedelta(seconds=20),
                                        window_seconds=60)
    stack.api.reset()
    stack.api.set_faults(error_every=2)
    assert stack.run("ticketing") == 0, stack.last_log.read_text()[-4000:]
    statuses = {str(s) for per in stack.api.stats()["by_endpoint"].values() for s in per}
    assert "503" in statuses, statuses
    run = stack.last_run("ticketing")
    # incremental: only what changed since the watermark (minus the lookback) is read again
    assert run["rows_extracted"] < len(stack.store.users) + len(stack.store.tickets)
    new_ids = changed["new_users"]
    assert stack.one("select count(*) from crm.customer_link where source = 'ticketing' and source_id = any(%s)",
                     (new_ids,)) == len(new_ids)
    marks_after = dict(((s, st), v) for s, st, v, _ in stack.snapshot()["watermarks"])
    assert marks_after[("ticketing", "users")] > marks_before[("ticketing", "users")]


def test_a_steward_decision_is_applied_by_the_next_dag_run_and_ids_stay(stack):
    from crm_sync.identity import apply as identity_apply

    # the two records' customers as they are now (an earlier run may have merged them since)
    items = stack.crm("""select i.review_id, i.source_a, i.source_id_a, i.source_b, i.source_id_b,
                                la.customer_id::text, lb.customer_id::text
                         from crm.review_item i
                         join crm.customer_link la on (la.source, la.source_id) = (i.source_a, i.source_id_a)
                         join crm.customer_link lb on (lb.source, lb.source_id) = (i.source_b, i.source_id_b)
                         where i.status = 'open' and la.customer_id <> lb.customer_id
                         order by i.probability desc, i.review_id""")
    assert items, "the sample sources put some cross-source pairs in the review band"
    review_id, sa, ia, sb, ib, ca, cb = items[0]
    conn = db.connect(stack.dsn)
    try:
        with conn.cursor() as cur:
            identity_apply.decide(cur, review_id, "same", by="steward.test", note="integration")
        conn.commit()
    finally:
        conn.close()
    before = {(s, i): str(c) for s, i, c in stack.snapshot()["links"]}
    stack.api.reset()
    stack.api.set_faults(error_every=0, rate_limit_every=0)
    assert stack.run("ticketing") == 0, stack.last_log.read_text()[-4000:]
    after = {(s, i): str(c) for s, i, c in stack.snapshot()["links"]}
    survivor, absorbed = sorted([ca, cb])
    assert after[(sa, ia)] == after[(sb, ib)] == survivor
    assert stack.one("select merged_into::text from crm.customer where customer_id = %s", (absorbed,)) == survivor
    status, applied = stack.crm("select status, applied_run_id from crm.review_item where review_id = %s",
                                (review_id,))[0]
    assert status == "same" and applied == stack.last_run("ticketing")["run_id"]
    # only the absorbed customer's records moved; every other record kept its customer id
    moved = {k for k in before if after.get(k) != before[k]}
    assert moved and all(before[k] == absorbed and after[k] == survivor for k in moved)
    # the decided pair is never asked again
    assert stack.one("""select count(*) from crm.review_item where status = 'open'
                        and ((source_id_a, source_id_b) = (%s, %s) or (source_id_a, source_id_b) = (%s, %s))""",
                     (ia, ib, ib, ia)) == 0


def test_bad_batch_is_blocked_quarantined_and_alerted(stack):
    before = stack.snapshot()
    mails = set(stack.mails())
    conn = db.connect(stack.erp_dsn)
    bad = erp.inject_bad_batch(conn, now=stack.ends["erp"] - timedelta(seconds=10))
    conn.close()
    try:
        assert stack.run("erp") != 0
        run = stack.last_run("erp")
        assert run["state"] == "blocked"
        assert run["failed_task"].startswith("validate.")
        assert "DataQualityError" in run["error"] and "batch blocked" in run["error"]
        reasons = stack.crm("select stream, source_pk, expectation, reason from sync.quarantine "
                            "where run_id = %s and stage = 'validate'", (run["run_id"],))
        keys = {pk for _, pk, _, _ in reasons}
        assert keys & set(bad.customers + bad.orders)
        assert all(exp for _, _, exp, _ in reasons)
        assert stack.snapshot() == before  # nothing loaded, no watermark moved
        new = sorted(set(stack.mails()) - mails)
        assert new, "no alert e-mail arrived"
        msg = email.message_from_bytes(new[-1].read_bytes(), policy=email.policy.default)
        assert "crm_sync__erp" in msg["Subject"] and "validate" in msg["Subject"]
        assert msg["To"] == "oncall-data@example.com"
        body = html.unescape(msg.get_body(preferencelist=("plain", "html")).get_content())
        assert run["run_id"] in body and "sync.quarantine" in body
        assert not re.search(r"1[3-9]\d{9}", body), "unmasked mobile in the alert"
        assert not re.search(r"[\w.+-]{2,}@[\w-]+\.(com|cn|net)", body.replace("crm-sync@localhost", "")), \
            "unmasked e-mail in the alert"
    finally:
        conn = db.connect(stack.erp_dsn)
        with conn.cursor() as cur:
            cur.execute("delete from src_erp.orders where order_no = any(%s)", (bad.orders,))
            cur.execute("delete from src_erp.customers where customer_no = any(%s)", (bad.customers,))
        conn.commit()
        conn.close()


def test_one_poisoned_record_is_quarantined_while_the_rest_of_its_batch_loads(stack):
    """Issue 9's acceptance: a real Airflow run, one bad order and one absurd key among good rows."""
    at = stack.ends["erp"] - timedelta(seconds=20)
    good = [f"POISON-OK-{i}" for i in range(3)]
    customer_no = _src(stack, "select customer_no from src_erp.customers order by customer_no limit 1")[0][0]
    conn = db.connect(stack.erp_dsn)
    with conn.cursor() as cur:
        for order_no in good:
            cur.execute("insert into src_erp.orders (order_no, customer_no, order_date, amount, currency, status, "
                        "updated_at) values (%s, %s, '2026-01-05', 12.50, 'CNY', 'paid', %s)", (order_no, customer_no, at))
        cur.execute("insert into src_erp.orders (order_no, customer_no, order_date, amount, currency, status, "
                    "updated_at) values ('POISON-XYZ', %s, '2026-01-05', 9.99, 'XYZ', 'paid', %s)", (customer_no, at))
        cur.execute("insert into src_erp.customers (customer_no, name, mobile, updated_at, created_at) "
                    "values (%s, '王五', '13900000000', %s, %s)", ("K" * 10_000, at, at))
    conn.commit()
    conn.close()
    try:
        assert stack.run("erp") == 0, stack.last_log.read_text()[-4000:]
        run = stack.last_run("erp")
        assert run["state"] == "success"
        loaded = stack.crm("select order_id from crm.sales_order where order_id like 'POISON-%%'")
        assert sorted(r[0] for r in loaded) == good
        reasons = dict(stack.crm("select coalesce(expectation, field), reason from sync.quarantine "
                                 "where run_id = %s and stream = 'orders' and source_pk = 'POISON-XYZ'", (run["run_id"],)))
        assert any("currency" in r or "in_set" in k for k, r in reasons.items()), reasons
        long_key = stack.crm("select field, reason from sync.quarantine where run_id = %s and stream = 'customers' "
                             "and stage = 'extract'", (run["run_id"],))
        assert [f for f, r in long_key if "10000 characters" in r] == ["customer_no"]
        account = stack.crm("select stream, lost from sync.stream_account where run_id = %s", (run["run_id"],))
        assert account and all(lost == 0 for _, lost in account)
    finally:
        conn = db.connect(stack.erp_dsn)
        with conn.cursor() as cur:
            cur.execute("delete from src_erp.orders where order_no like 'POISON-%'")
            cur.execute("delete from src_erp.customers where length(customer_no) > 512")
        conn.commit()
        conn.close()


def test_api_that_stays_down_fails_clearly_without_partial_load(stack):
    before = stack.snapshot()
    mails = set(stack.mails())
    stack.store.apply_changes(seed=SEED + 2, now=stack.ends["ticketing"] - timedelta(seconds=10), window_seconds=5)
    stack.api.reset()
    stack.api.set_faults(outage=True)
    try:
        assert stack.run("ticketing") != 0
    finally:
        stack.api.reset()
    run = stack.last_run("ticketing")
    assert run["state"] == "failed"
    assert run["failed_task"].startswith("extract.")
    assert "source 'ticketing'" in run["error"] and "failed after 3 attempts" in run["error"]
    assert "503" in run["error"]
    assert stack.snapshot() == before
    assert set(stack.mails()) - mails, "no alert e-mail for the outage"


def test_the_demo_runs_its_dags_in_order_in_one_airflow_process_each_with_its_own_connections(stack):
    """`demo.run_dags` (what `make demo` runs): several DagRuns in one Airflow process, in order, each
    with its own environment, log and exit code as `airflow dags test` would give them."""
    before = stack.snapshot()
    wrong = dict(stack.env)
    wrong["AIRFLOW_CONN_TICKETING_API"] = json.dumps({"conn_type": "http", "host": "127.0.0.1",
                                                      "port": stack.api.port, "schema": "http",
                                                      "password": "not-the-desk-token"})
    logs = [stack.tmp / "runner-erp.log", stack.tmp / "runner-ticketing.log"]
    erp_dag, ticketing_dag = stack.configs["erp"].dag_id, stack.configs["ticketing"].dag_id
    finished: list[dict] = []
    done = demo.run_dags([(erp_dag, stack.now, stack.env, logs[0]),
                          (ticketing_dag, stack.now, wrong, logs[1])], finished.append)
    assert finished == done
    assert [(d["dag_id"], d["exit"]) for d in done] == [(erp_dag, 0), (ticketing_dag, 1)], logs[1].read_text()[-3000:]
    erp_log, ticketing_log = (log.read_text() for log in logs)
    # each run's output in its own log
    assert "extract.customers" in erp_log and "extract.users" not in erp_log
    assert "extract.users" in ticketing_log and "extract.customers" not in ticketing_log
    # the second run read its own connection: the desk refused it, and nothing was loaded
    assert "401" in ticketing_log, ticketing_log[-3000:]
    assert "not-the-desk-token" not in ticketing_log and stack.token not in erp_log + ticketing_log
    assert stack.snapshot() == before
    run = stack.last_run("ticketing")
    assert run["state"] == "failed" and "source 'ticketing'" in run["error"]
