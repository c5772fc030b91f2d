"""The four newer sources end to end through real Airflow runs (`airflow dags test`).

One module-wide stack: a fresh CRM database, the finance system in its own database, a landing
folder of spreadsheets (with an undecodable file and one without a customer column), the IM and
call-center API simulators and an SMTP outbox, all on loopback. The tests run in file order like
a day of operations: first loads of every source, then a day later the orphans' customers arrive
and the facts that waited for them are loaded. Every source row is counted: loaded, held
(quarantined "customer not known yet") or otherwise quarantined with a reason.
"""
from __future__ import annotations

import email
import email.policy
import html
import json
import secrets
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from crm_sync import db, demo
from crm_sync.config import load_source_file
from crm_sync.facts import NOT_KNOWN_YET
from crm_sync.simulators import callcenter, finance, im, people, spreadsheet
from crm_sync.simulators.smtp_outbox import OutboxServer
from dagstack import DagStack, airflow_env, copy_include

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
SEED = 11
SOURCES = ("finance", "spreadsheet", "im", "callcenter")


class Stack(DagStack):
    def finance(self, sql: str):
        conn = db.connect(self.finance_dsn)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def stack(fresh_dsn, pg_admin_dsn, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sources")
    include = copy_include(tmp, fast_http=("im", "callcenter"))
    configs = {name: load_source_file(include / "sources" / f"{name}.yaml") for name in SOURCES}
    now = datetime.now(timezone.utc)
    end = min(demo.interval_end(cfg, now) for cfg in configs.values())
    pool = people.generate_people(300, SEED)

    fin_db = f"crm_test_fin_{uuid.uuid4().hex[:8]}"
    db.ensure_database(pg_admin_dsn, fin_db)
    finance_dsn = db.with_database(pg_admin_dsn, fin_db)
    conn = db.connect(finance_dsn)
    seeded = finance.seed(conn, people=pool, seed=SEED, now=end - timedelta(hours=2))
    conn.close()

    landing = tmp / "landing"
    landing.mkdir()
    manifest = spreadsheet.write_landing(landing, pool, seed=SEED, now=end - timedelta(hours=2), files=4)
    bad_files = spreadsheet.write_bad_files(landing)

    im_store = im.ImStore.generate(pool, seed=SEED, now=end - timedelta(hours=2))
    cc_store = callcenter.CallCenterStore.generate(pool, seed=SEED, now=end - timedelta(hours=2))
    key, login, password = (secrets.token_urlsafe(12) for _ in range(3))
    outbox = tmp / "outbox"
    with im.ImServer(im_store, api_key=key, faults=im.Faults(rate_limit_every=5)) as im_api, \
            callcenter.CallCenterServer(cc_store, login=login, password=password) as cc_api, \
            OutboxServer(outbox) as smtp:
        connections = {
            "crm_db": db.airflow_conn_json(fresh_dsn),
            "finance_src": db.airflow_conn_json(finance_dsn),
            "spreadsheet_landing": json.dumps({"conn_type": "fs", "extra": {"path": str(landing)}}),
            "im_api": json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": im_api.port, "schema": "http",
                                  "password": key}),
            "callcenter_api": json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": cc_api.port,
                                          "schema": "http", "login": login, "password": password}),
            "smtp_alerts": json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": smtp.port,
                                       "extra": {"disable_ssl": True, "disable_tls": True, "timeout": 10,
                                                 "retry_limit": 1, "from_email": "crm-sync@localhost"}}),
        }
        env = airflow_env(connections, include)
        yield Stack(tmp=tmp, configs=configs, now=now, end=end, dsn=fresh_dsn, finance_dsn=finance_dsn,
                    seeded=seeded, landing=landing, manifest=manifest, bad_files=bad_files, im=im_store,
                    cc=cc_store, outbox=outbox, env=env, pool=pool)
    db.drop_database(pg_admin_dsn, fin_db)


def _held(stack, source: str, stream: str) -> set[str]:
    return {pk for (pk,) in stack.crm("select source_pk from sync.held_fact where source = %s and stream = %s"
                                      " and released_run_id is null", (source, stream))}


def test_finance_loads_every_amount_to_the_cent_and_holds_unknown_buyers(stack):
    assert stack.run("finance") == 0, stack.last_log.read_text()[-4000:]
    run = stack.last_run("finance")
    assert run["state"] == "success"
    truth = stack.seeded.truth
    for table, stream, target, key, column, amount_col in (
            ("fp", "invoices", "crm.invoice", "invoice_id", "je", "amount"),
            ("fp", "invoices", "crm.invoice", "invoice_id", "jshj", "total_amount"),
            ("ht", "contracts", "crm.contract", "contract_id", "htje", "amount"),
            ("sk", "payments", "crm.payment", "payment_id", "skje", "amount")):
        loaded = dict(stack.crm(f"select {key}, {amount_col} from {target} where source = 'finance'"))
        held = _held(stack, "finance", stream)
        # every source row is loaded or held, none twice
        assert set(loaded) | held == set(truth.amounts[table][column]) and not set(loaded) & held, stream
        assert all(loaded[pk] == truth.amounts[table][column][pk] for pk in loaded), stream
        assert sum(loaded.values()) == sum(v for pk, v in truth.amounts[table][column].items() if pk not in held)
    assert _held(stack, "finance", "invoices") == set(truth.orphan_invoices)
    assert _held(stack, "finance", "payments") == set(truth.orphan_payments)
    reasons = stack.crm("select distinct reason from sync.quarantine where run_id = %s and stage = 'load'",
                        (run["run_id"],))
    assert reasons == [(NOT_KNOWN_YET,)]
    checks = stack.crm("select stream, check_name, source_value, target_value, ok from sync.reconciliation"
                       " where run_id = %s", (run["run_id"],))
    names = {(s, c) for s, c, *_ in checks}
    assert {("invoices", "amount_sum"), ("invoices", "tax_amount_sum"), ("invoices", "total_amount_sum"),
            ("contracts", "amount_sum"), ("payments", "amount_sum")} <= names
    assert all(ok for *_, ok in checks)
    # the contract amounts came as '1.234,50' and the refunds as '(1,234.50)'
    assert stack.one("select count(*) from crm.payment where source = 'finance' and amount < 0") > 0


def test_spreadsheets_are_read_once_archived_and_bad_files_rejected_with_a_reason(stack):
    before_mail = set(stack.outbox.glob("*.eml"))
    assert stack.run("spreadsheet") == 0, stack.last_log.read_text()[-4000:]
    run = stack.last_run("spreadsheet")
    assert run["state"] == "success"
    archived = sorted(p.name for p in (stack.landing / "archive").iterdir())
    assert archived == sorted(f.name for f in stack.manifest.files)
    rejected = stack.landing / "rejected"
    for name in stack.bad_files:
        assert (rejected / name).exists(), name
        reason = (rejected / f"{name}.reason.txt").read_text(encoding="utf-8")
        assert name in reason
    quarantined = dict(stack.crm("select source_pk, field from sync.quarantine where run_id = %s"
                                 " and source_pk = any(%s)", (run["run_id"], list(stack.bad_files))))
    assert set(quarantined) == set(stack.bad_files)
    new_mail = set(stack.outbox.glob("*.eml")) - before_mail
    assert len(new_mail) == 1
    msg = email.message_from_bytes(next(iter(new_mail)).read_bytes(), policy=email.policy.default)
    body = html.unescape("".join(p.get_content() for p in msg.walk() if p.get_content_type() == "text/html"))
    assert "WARNING spreadsheet" in str(msg["Subject"])
    for name in stack.bad_files:
        assert name in body and "rejected" in body
    # every non-blank row became a source record (rows of one customer in two files are one record)
    keys = stack.one("select count(*) from crm.source_customer where source = 'spreadsheet'")
    assert 0 < keys <= sum(f.rows for f in stack.manifest.files)
    assert stack.one("select count(*) from stg.extracted where run_id = %s", (run["run_id"],)) == keys

    assert stack.run("spreadsheet") == 0, stack.last_log.read_text()[-4000:]
    again = stack.last_run("spreadsheet")
    assert again["rows_extracted"] == 0 and again["state"] == "success"


def test_im_loads_contacts_and_closed_sessions_and_holds_orphans(stack):
    assert stack.run("im") == 0, stack.last_log.read_text()[-4000:]
    run = stack.last_run("im")
    assert run["state"] == "success", run["error"]
    closed = {s["session_id"] for s in stack.im.sessions if s["status"] == "closed"}
    loaded = {pk for (pk,) in stack.crm("select interaction_id from crm.interaction where source = 'im'")}
    held = _held(stack, "im", "sessions")
    assert loaded | held == closed and not loaded & held
    orphans = {s for s in stack.im.orphan_sessions if s in closed}
    rejected_contacts = {pk for (pk,) in stack.crm("select source_pk from sync.quarantine where run_id = %s"
                                                   " and stream = 'contacts'", (run["run_id"],))}
    contact_of = {s["session_id"]: s["external_userid"] for s in stack.im.sessions}
    # held: the sessions of contacts the IM does not serve yet, and of contacts this run quarantined
    assert held == orphans | {s for s in closed if contact_of[s] in rejected_contacts}
    assert orphans
    kinds = stack.crm("select distinct kind from crm.interaction where source = 'im'")
    assert kinds == [("chat",)]
    # every loaded session points at the customer its contact is linked to
    assert stack.one("""select count(*) from crm.interaction i join crm.customer_link l
                        on l.source = 'im' and l.source_id = i.source_customer_id
                        where i.source = 'im' and i.customer_id <> l.customer_id""") == 0


def test_calls_find_their_customer_by_number_in_any_form(stack):
    assert stack.run("callcenter") == 0, stack.last_log.read_text()[-4000:]
    run = stack.last_run("callcenter")
    assert run["state"] == "success", run["error"]
    calls = {c["call_id"] for c in stack.cc.calls}
    loaded = dict(stack.crm("select interaction_id, customer_id::text from crm.interaction"
                            " where source = 'callcenter'"))
    held = _held(stack, "callcenter", "calls")
    quarantined = {pk for (pk,) in stack.crm("select source_pk from sync.quarantine where run_id = %s"
                                             " and stage <> 'load'", (run["run_id"],))}
    assert set(loaded) | held | quarantined == calls
    unknown = {cid for cid, person in stack.cc.truth.items() if person is None}
    assert unknown <= held | quarantined  # an unknown number never lands on somebody's customer
    assert loaded, "no call found its customer"
    # full-width digits, 0086- and '转' extensions were all understood
    forms = {c["call_id"]: (c["caller"] if c["direction"] == "inbound" else c["callee"]) for c in stack.cc.calls}
    assert any(any("０" <= ch <= "９" for ch in forms[cid]) for cid in loaded)


def test_a_day_later_the_orphans_customers_arrive_and_held_facts_are_loaded(stack):
    later = datetime.now(timezone.utc)
    waiting = _held(stack, "im", "sessions") & set(stack.im.orphan_sessions)
    stack.im.apply_changes(seed=SEED + 1, now=later - timedelta(seconds=5), window_seconds=60)
    conn = db.connect(stack.finance_dsn)
    # the clerk keys in the missing customers before the night's snapshot (the interval end)
    fin_end = demo.interval_end(stack.configs["finance"], later)
    changes = finance.apply_changes(conn, seed=SEED + 1, now=fin_end - timedelta(seconds=5))
    conn.close()
    assert changes.resolved_orphans
    stack.now = later + timedelta(hours=1)  # the next scheduled run covers the changes
    held_sessions = _held(stack, "im", "sessions")
    held_invoices = _held(stack, "finance", "invoices")

    assert stack.run("im") == 0, stack.last_log.read_text()[-4000:]
    released = held_sessions - _held(stack, "im", "sessions")
    # the orphans' contacts arrived (and an edited contact may now pass validation): their sessions load
    assert waiting and waiting <= released
    run = stack.last_run("im")
    # the run releases what any source held for the customers it brought: calls by their numbers too
    by_run = dict(stack.crm("select stream, count(*) from sync.held_fact where released_run_id = %s group by 1",
                            (run["run_id"],)))
    assert by_run["sessions"] == len(released) and run["facts_released"] == sum(by_run.values())
    assert stack.one("select count(*) from crm.interaction where interaction_id = any(%s)", (list(released),)) == \
        len(released)
    assert stack.run("finance") == 0, stack.last_log.read_text()[-4000:]
    assert not _held(stack, "finance", "invoices") and held_invoices
    released = stack.crm("select invoice_id, amount from crm.invoice where invoice_id = any(%s)",
                         (list(held_invoices),))
    assert {pk for pk, _ in released} == held_invoices
    assert all(a == stack.seeded.truth.amounts["fp"]["je"][pk] for pk, a in released)


def test_status_lists_every_source(stack):
    proc = subprocess.run([sys.executable, "-m", "crm_sync", "status", "--json"], capture_output=True, text=True,
                          env={**stack.env, "CRM_SYNC_DSN": stack.dsn}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert set(doc["sources"]) == {"erp", "ticketing", "im", "callcenter", "finance", "spreadsheet"}
    for name in SOURCES:
        assert doc["sources"][name]["last_run"]["state"] == "success", name
    assert doc["sources"]["finance"]["rows"]["invoice"] > 0
    assert doc["sources"]["callcenter"]["held_facts"] >= 0
