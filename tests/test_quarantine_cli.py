"""`crm-sync quarantine list|release|discard|expire|purge` against a real PostgreSQL.

Rows are written the way the stages write them (`quarantine.add` with the stages' reasons, and the
plain INSERT of a held fact), for the project's own source YAMLs. Assertions read what a steward
sees on the terminal and the rows behind it: rules and fields, masked values, statuses, who did
what, and how a released key comes back (the extract window and the load's settlement).
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from crm_sync import quarantine, runlog, staging
from crm_sync.cli import main
from crm_sync.config import load_source
from crm_sync.quarantine import Reject, where
from crm_sync.watermark import Window

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def clean(conn, fresh_dsn, monkeypatch):
    """Each test starts with an empty quarantine, and the command talks to the module's database."""
    monkeypatch.setenv("CRM_SYNC_DSN", fresh_dsn)
    monkeypatch.setenv("CRM_SYNC_USER", "steward")
    monkeypatch.delenv("CRM_SYNC_QUARANTINE_EXPIRY_DAYS", raising=False)
    with conn.cursor() as cur:
        cur.execute("truncate sync.quarantine, sync.quarantine_action, sync.run_log, sync.stream_account,"
                    " sync.held_fact, stg.extracted")
    conn.commit()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def rows(conn, query: str, params=()) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall()


def erp_customer(no: str, **overrides) -> dict:
    record = {"customer_no": no, "name": "张伟", "mobile": "13800138000", "phone": None,
              "email": f"{no.lower()}@example.com", "company": "北京华信科技有限公司", "city": "北京",
              "created_at": T0.isoformat(), "updated_at": T0.isoformat()}
    record.update(overrides)
    return record


def email_reject(no: str, value: str) -> Reject:
    """A validate-stage reject as validate.py writes it (its own reason already masks the value)."""
    return Reject("customers", no, "validate", "email",
                  f"{where('erp', 'customers', no, 'email')}: expect_column_values_to_match_regex failed: value "
                  f"'{value[:1]}***' does not match ^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$",
                  {"source_pk": no, "email": value, "full_name": "张伟"},
                  expectation="expect_column_values_to_match_regex")


def add(conn, run_id: str, source: str, rejects: list[Reject], *, created_at: datetime | None = None) -> None:
    with conn.cursor() as cur:
        quarantine.add(cur, run_id, source, rejects)
        if created_at is not None:
            cur.execute("update sync.quarantine set created_at = %s where run_id = %s", (created_at, run_id))
    conn.commit()


def seed_erp(conn) -> None:
    """One erp run: two malformed e-mails, an unknown currency, a null cursor, a superseded version."""
    add(conn, "erp__r1", "erp", [
        email_reject("C1", "zhang.wei@"),
        email_reject("C2", "li.na@163"),
        Reject("orders", "SO1", "validate", "currency",
               f"{where('erp', 'orders', 'SO1', 'currency')}: expect_column_values_to_be_in_set failed: value 'XXX' "
               "is not one of ['CNY', 'USD']", {"source_pk": "SO1", "currency": "XXX"},
               expectation="expect_column_values_to_be_in_set"),
        Reject("customers", "C3", "extract", "updated_at",
               "cursor field is missing; the record cannot be placed in a window (fix the value in the source)",
               erp_customer("C3", updated_at=None)),
        Reject("customers", "C4", "extract", "updated_at", "superseded: a newer version of this key came in the "
               "same batch; this version was not loaded", erp_customer("C4"), blocks_key=False),
    ])


def test_every_row_gets_a_rule_and_a_masked_value_and_the_stored_reason_is_untouched(conn):
    seed_erp(conn)
    calls = load_source("callcenter").stream("calls")
    bad_call = {"call_id": "CALL7", "direction": "inbound", "caller": "1380013800", "callee": "4008001234",
                "created_at": T0.isoformat(), "start_time": T0.isoformat()}
    add(conn, "cc__r1", "callcenter", [
        Reject("calls", "CALL7", "map", "source_customer_id",
               f"{where('callcenter', 'calls', 'CALL7', 'source_customer_id')}: '1380013800' is not a phone number "
               "(other) (from 'callee/caller')", bad_call)])
    assert calls.mapping["source_customer_id"].type == "phone"
    with conn.cursor() as cur:  # what facts.py writes for a fact whose customer is unknown (no Reject)
        cur.execute("""insert into sync.quarantine (run_id, source, stream, source_pk, stage, field, reason, payload)
                       values ('cc__r1', 'callcenter', 'calls', 'CALL8', 'load', 'source_customer_id',
                               'customer not known yet', '{"ref_by": "phone"}')""")
    conn.commit()

    got = {pk: rest for pk, *rest in rows(conn, "select source_pk, stage, reason_code, field, masked_value, reason"
                                                " from sync.quarantine")}

    assert got["C1"][:4] == ["validate", "expect_column_values_to_match_regex", "email", "z***"]
    assert got["C2"][3] == "l***@163"
    assert got["SO1"][1:4] == ["expect_column_values_to_be_in_set", "currency", "XXX"]
    assert got["C3"][:3] == ["extract", "extract.null_cursor", "updated_at"]
    assert got["C4"][1] == "extract.superseded"
    # the phone comes from `caller` (picked by direction): masked as a phone, in the value and the reason
    stage_, code, field, value, reason = got["CALL7"]
    assert (stage_, code, field, value) == ("map", "map.cast", "source_customer_id", "***3800")
    assert "'1380013800' is not a phone number" in reason  # stored as the stage wrote it, masked when read
    [shown] = quarantine.list_rows(conn, source="callcenter", rule="map.cast")
    assert "1380013800" not in shown["reason"] and "'***3800' is not a phone number" in shown["reason"]
    [group] = quarantine.summary(conn, source="callcenter", rule="map.cast")
    assert (group["example_value"], group["example_reason"]) == ("***3800", shown["reason"])
    assert got["CALL8"][:3] == ["load", "load.customer_not_known", "source_customer_id"]


def test_list_groups_by_rule_and_field_and_shows_only_masked_values(conn, capsys):
    seed_erp(conn)
    add(conn, "erp__r2", "erp", [email_reject("C1", "zhang.wei@")])  # the same key rejected again

    code, out, _ = run(capsys, "quarantine", "list", "--source", "erp")

    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "quarantine of source 'erp': 4 records (open/released) in 3 groups"
    assert lines[1].split() == ["STREAM", "STAGE", "RULE", "FIELD", "KEYS", "ROWS", "STATUS", "EXAMPLE"]
    assert lines[2].split() == ["customers", "validate", "expect_column_values_to_match_regex", "email", "2", "3",
                                "open", "3", "z***"]
    assert lines[3].split() == ["customers", "extract", "extract.null_cursor", "updated_at", "1", "1", "open", "1",
                                "-"]
    assert lines[4].split() == ["orders", "validate", "expect_column_values_to_be_in_set", "currency", "1", "1",
                                "open", "1", "XXX"]
    assert "extract.superseded" not in out  # a superseded version never blocked anything
    assert "zhang.wei@" not in out and "li.na@163" not in out
    assert "crm-sync quarantine release --source erp --rule RULE" in out

    code, out, _ = run(capsys, "quarantine", "list", "--source", "erp", "--rule",
                       "expect_column_values_to_match_regex", "--rows")
    assert code == 0
    assert "#" in out and "erp/customers 'C1' [open] validate expect_column_values_to_match_regex email = z***" in out
    assert "erp/customers 'C2' [open] validate expect_column_values_to_match_regex email = l***@163" in out
    assert "run erp__r2 at " in out and "value 'z***' does not match" in out
    assert "zhang.wei@" not in out and "li.na@163" not in out

    code, out, _ = run(capsys, "quarantine", "list", "--run", "erp__r1", "--json")
    doc = json.loads(out)
    assert doc["filter"]["status"] == "all"
    groups = {(g["stream"], g["rule"], g["field"]): g for g in doc["groups"]}
    assert groups[("customers", "expect_column_values_to_match_regex", "email")]["keys"] == 2
    assert groups[("orders", "expect_column_values_to_be_in_set", "currency")]["status"] == {"open": 1}

    assert "extract.superseded" in {g["rule"] for g in quarantine.summary(conn, run_id="erp__r1", source="erp",
                                                                          blocking_only=False)}


def test_release_marks_rows_for_the_next_run_and_a_second_release_finds_nothing(conn, capsys):
    seed_erp(conn)

    code, out, _ = run(capsys, "quarantine", "release", "--source", "erp", "--rule",
                       "expect_column_values_to_match_regex", "--note", "addresses fixed in the ERP")

    assert code == 0
    lines = out.splitlines()
    assert lines[0] == ("released 2 rows (2 records) of source 'erp' (rule expect_column_values_to_match_regex):")
    assert lines[2].split()[:6] == ["customers", "validate", "expect_column_values_to_match_regex", "email", "2", "2"]
    assert lines[-1] == ("erp is a full refresh: the next run of crm_sync__erp reads every key again and settles "
                         "these rows.")
    assert rows(conn, "select source_pk, status, status_by, status_note from sync.quarantine"
                      " where status <> 'open' order by 1") == [
        ("C1", "released", "steward", "addresses fixed in the ERP"),
        ("C2", "released", "steward", "addresses fixed in the ERP")]
    assert rows(conn, "select action, source_pk, reason_code, masked_value, acted_by from sync.quarantine_action"
                      " order by source_pk") == [
        ("release", "C1", "expect_column_values_to_match_regex", "z***", "steward"),
        ("release", "C2", "expect_column_values_to_match_regex", "l***@163", "steward")]

    code, _, err = run(capsys, "quarantine", "release", "--source", "erp", "--rule",
                       "expect_column_values_to_match_regex")
    assert code == 1
    assert err.strip() == ("crm-sync quarantine release: no open or expired rows of source 'erp' match "
                           "(rule expect_column_values_to_match_regex)")

    code, out, _ = run(capsys, "quarantine", "list", "--source", "erp", "--status", "released", "--rows")
    assert "[released]" in out and "released by steward at " in out and ": addresses fixed in the ERP" in out


def call(i: int, cursor: datetime, **overrides) -> dict:
    record = {"call_id": f"CALL{i}", "direction": "inbound", "caller": "13800138000", "callee": "4008001234",
              "start_time": cursor.isoformat(), "duration": 60, "created_at": cursor.isoformat()}
    record.update(overrides)
    return record


def test_a_released_key_widens_the_next_window_and_that_runs_load_settles_it(conn, capsys):
    cfg = load_source("callcenter")
    stream = cfg.stream("calls")
    r1 = "scheduled__2026-03-01T08:30:00+00:00"
    with conn.cursor() as cur:
        runlog.start(cur, r1, "callcenter", cfg.dag_id, T0, T0 + timedelta(hours=1))
        cur.execute("""insert into sync.stream_account (run_id, source, stream, window_since, window_until)
                       values (%s, 'callcenter', 'calls', %s, %s)""", (r1, T0 - timedelta(minutes=20),
                                                                       T0 + timedelta(hours=1)))
    bad = [call(1, T0 + timedelta(minutes=5), caller="1380013800"),   # fixed in the source later
           call(2, T0 + timedelta(minutes=6), caller="12345"),        # still bad when read again
           call(3, T0 + timedelta(minutes=7), caller="999")]          # deleted in the source meanwhile
    add(conn, r1, "callcenter", [
        Reject("calls", r["call_id"], "map", "source_customer_id",
               f"{where('callcenter', 'calls', r['call_id'], 'source_customer_id')}: {r['caller']!r} is not a phone "
               "number (other)", r) for r in bad])
    add(conn, r1, "callcenter", [Reject("calls", "CALL4", "extract", "created_at",
                                        "cursor field is not a timestamp: 'yesterday'; the record cannot be placed "
                                        "in a window (fix the value in the source)", call(4, T0, created_at="yesterday"))])

    # a day later nothing is released yet: the regular window stays
    later = Window(since=T0 + timedelta(days=1), until=T0 + timedelta(days=1, hours=1))
    assert quarantine.release_window(conn, cfg, stream, later) == later

    code, out, _ = run(capsys, "quarantine", "release", "--source", "callcenter", "--run", r1, "--by", "alice")
    assert code == 0
    assert out.startswith(f"released 4 rows (4 records) of source 'callcenter' (run {r1}):")
    # CALL4's cursor is unreadable: the window of the run that rejected it (08:00 - 20 min) is the bound
    assert out.splitlines()[-1] == ("The next run of crm_sync__callcenter reads back to 2026-03-01T07:20:00+00:00 "
                                    "to get them again, and its load settles these rows.")

    widened = quarantine.release_window(conn, cfg, stream, later)
    assert widened == Window(since=T0 - timedelta(minutes=40), until=later.until)
    full = Window(since=None, until=later.until)
    assert quarantine.release_window(conn, cfg, stream, full) == full

    # the next run reads that window: CALL1 and CALL4 come back fixed, CALL2 is still bad, CALL3 is gone
    r2 = "scheduled__2026-03-02T08:30:00+00:00"
    with conn.cursor() as cur:
        runlog.start(cur, r2, "callcenter", cfg.dag_id, later.since, later.until)
        cur.execute("""insert into sync.stream_account (run_id, source, stream, window_since, window_until)
                       values (%s, 'callcenter', 'calls', %s, %s)""", (r2, widened.since, widened.until))
        staging.copy_rows(cur, "stg.extracted", ["run_id", "source", "stream", "source_pk", "cursor_value", "payload"],
                          [(r2, "callcenter", "calls", f"CALL{i}", T0, call(i, T0)) for i in (1, 2, 4)])
        quarantine.add(cur, r2, "callcenter", [Reject("calls", "CALL2", "map", "source_customer_id",
                                                      "'12345' is not a phone number (other)", call(2, T0,
                                                                                                   caller="12345"))])
        settled = quarantine.settle(cur, r2, cfg)
    conn.commit()

    assert settled == {"resolved": 2, "retried": 1, "not_found": 1, "held_loaded": 0}
    assert rows(conn, "select source_pk, status, retry_run_id from sync.quarantine where run_id = %s order by 1",
                (r1,)) == [("CALL1", "resolved", r2), ("CALL2", "retried", r2), ("CALL3", "retried", r2),
                           ("CALL4", "resolved", r2)]
    assert quarantine.release_window(conn, cfg, stream, later) == later  # nothing pending any more

    code, out, _ = run(capsys, "quarantine", "list", "--source", "callcenter")
    assert out.splitlines()[0] == "quarantine of source 'callcenter': 1 record (open/released) in 1 group"
    assert f"run {r2}" in run(capsys, "quarantine", "list", "--source", "callcenter", "--rows")[1]
    code, out, _ = run(capsys, "quarantine", "list", "--source", "callcenter", "--run", r1, "--rows")
    assert "[resolved]" in out and f"(run {r2})" in out and "not in the source any more" in out
    assert "1380013800" not in out and "'***3800' is not a phone number" in out


def test_an_open_row_is_resolved_when_a_later_run_loads_its_key_without_a_release(conn):
    cfg = load_source("callcenter")
    add(conn, "cc__a", "callcenter", [Reject("calls", "CALL9", "map", "source_customer_id", "'1' is not a phone "
                                             "number (other)", call(9, T0, caller="1"))])
    with conn.cursor() as cur:
        staging.copy_rows(cur, "stg.extracted", ["run_id", "source", "stream", "source_pk", "cursor_value", "payload"],
                          [("cc__b", "callcenter", "calls", "CALL9", T0, call(9, T0))])
        assert quarantine.settle(cur, "cc__b", cfg)["resolved"] == 1
    conn.commit()
    assert rows(conn, "select status, retry_run_id from sync.quarantine") == [("resolved", "cc__b")]


def test_discard_needs_a_reason_and_a_selection_and_keeps_the_row(conn, capsys):
    seed_erp(conn)
    [(qid,)] = rows(conn, "select quarantine_id from sync.quarantine where source_pk = 'SO1'")

    code, _, err = run(capsys, "quarantine", "discard", "--source", "erp", "--reason", "test data")
    assert code == 2 and "say which rows (--run, --stream, --rule or --id), or --all" in err
    with pytest.raises(SystemExit):
        main(["quarantine", "discard", "--source", "erp", "--id", str(qid)])  # --reason is required
    capsys.readouterr()

    code, out, _ = run(capsys, "quarantine", "discard", "--source", "erp", "--id", str(qid), "--by", "bob",
                       "--reason", "test order typed in production")

    assert code == 0
    assert out.splitlines()[0] == f"discarded 1 row (1 record) of source 'erp' (ids {qid}):"
    assert out.splitlines()[-1] == ("They are never retried and stay on record (status discarded, by bob: "
                                    "test order typed in production) until purged.")
    assert rows(conn, "select status, status_by, status_note from sync.quarantine where quarantine_id = %s",
                (qid,)) == [("discarded", "bob", "test order typed in production")]
    assert rows(conn, "select action, acted_by, note from sync.quarantine_action") == [
        ("discard", "bob", "test order typed in production")]
    code, _, err = run(capsys, "quarantine", "discard", "--source", "erp", "--id", str(qid), "--reason", "again")
    assert code == 1 and "no open, released or expired rows of source 'erp' match (ids" in err
    assert "orders" not in run(capsys, "quarantine", "list", "--source", "erp")[1]


def test_rows_unsettled_longer_than_the_expiry_age_expire_once_with_what_to_alert(conn, capsys, monkeypatch):
    now = datetime.now(timezone.utc)
    add(conn, "erp__old", "erp", [email_reject("C1", "zhang.wei@"), email_reject("C2", "li.na@163")],
        created_at=now - timedelta(days=31))
    add(conn, "erp__new", "erp", [email_reject("C1", "zhang.wei@"), email_reject("C9", "wu@x")],
        created_at=now - timedelta(days=2))

    code, out, _ = run(capsys, "quarantine", "expire", "--source", "erp")

    assert code == 0
    lines = out.splitlines()
    # C1's oldest row is 31 days old: its newer row goes with it; C9 is 2 days old and stays open
    assert lines[0] == "expired 3 rows (2 records):"
    assert lines[1].split() == ["SOURCE", "STREAM", "STAGE", "RULE", "FIELD", "KEYS", "ROWS", "EXAMPLE"]
    assert lines[2].split() == ["erp", "customers", "validate", "expect_column_values_to_match_regex", "email", "2",
                                "3", "z***"]
    assert rows(conn, "select run_id, source_pk, status, status_by from sync.quarantine order by 1, 2") == [
        ("erp__new", "C1", "expired", "crm-sync expiry"), ("erp__new", "C9", "open", None),
        ("erp__old", "C1", "expired", "crm-sync expiry"), ("erp__old", "C2", "expired", "crm-sync expiry")]
    assert run(capsys, "quarantine", "expire", "--source", "erp")[1].strip() == "nothing expired"

    # the age comes from the environment when no --days is given; expire() returns the alert's rows
    monkeypatch.setenv("CRM_SYNC_QUARANTINE_EXPIRY_DAYS", "1")
    expired = quarantine.expire(conn)
    conn.commit()
    assert [(r["source_pk"], r["rule"], r["value"]) for r in expired] == [
        ("C9", "expect_column_values_to_match_regex", "w***@x")]
    monkeypatch.setenv("CRM_SYNC_QUARANTINE_EXPIRY_DAYS", "soon")
    code, _, err = run(capsys, "quarantine", "expire")
    assert code == 2 and "CRM_SYNC_QUARANTINE_EXPIRY_DAYS='soon' is not a whole number of days" in err

    # an expired row can still be released once the source is fixed
    assert run(capsys, "quarantine", "release", "--source", "erp", "--id",
               str(rows(conn, "select min(quarantine_id) from sync.quarantine")[0][0]))[0] == 0


def test_purge_deletes_only_settled_rows_and_keeps_the_stewards_actions(conn, capsys):
    seed_erp(conn)
    run(capsys, "quarantine", "discard", "--source", "erp", "--stream", "orders", "--reason", "test orders")
    run(capsys, "quarantine", "release", "--source", "erp", "--rule", "extract.null_cursor")
    with conn.cursor() as cur:
        cur.execute("update sync.quarantine set status = 'resolved', status_at = now() - interval '100 days'"
                    " where source_pk = 'C3'")
        cur.execute("update sync.quarantine set created_at = now() - interval '100 days',"
                    " status_at = case when status_at is null then null else now() - interval '100 days' end")
    conn.commit()

    code, out, _ = run(capsys, "quarantine", "purge", "--older-than-days", "90")

    assert (code, out.strip()) == (0, "purged 3 settled quarantine rows older than 90 days")
    # left: the two open e-mail rows; gone: discarded SO1, resolved C3, superseded C4
    assert rows(conn, "select source_pk, status from sync.quarantine order by 1") == [("C1", "open"), ("C2", "open")]
    assert rows(conn, "select action, source_pk from sync.quarantine_action order by 1") == [
        ("discard", "SO1"), ("release", "C3")]
    code, _, err = run(capsys, "quarantine", "purge", "--older-than-days", "0")
    assert code == 2 and "purge keeps at least a day of history" in err
