"""Quality reports: GX Data Docs of each validation and the per-run report, from a real run of the stages.

Real PostgreSQL and real Great Expectations: ERP customers are staged as the extract leaves them,
then resolved, mapped and validated as the DAG does. The report must name the failed expectation
with its counts, show the quarantine grouped by rule and field, and never show a malformed e-mail
address or phone number of an e-mail or phone field in clear — in the report or the Data Docs.
"""
from __future__ import annotations

import json
import re
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from crm_sync import mapping, runlog, staging
from crm_sync.cli import main
from crm_sync.config import load_source
from crm_sync.identity.resolve import resolve
from crm_sync.keys import canonical_key
from crm_sync.quality import report
from crm_sync.quality.validate import DataQualityError, load_suite_doc, validate_stream

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
RAW = ("zhang.wei@", "li.na@163", "1380013800")  # what must never appear in clear


@pytest.fixture()
def include(tmp_path, monkeypatch):
    """The project's include folder, with a customer suite that also checks the raw mobile number."""
    root = tmp_path / "include"
    shutil.copytree(ROOT / "include", root)
    monkeypatch.setenv("CRM_SYNC_INCLUDE_DIR", str(root))
    monkeypatch.setenv(report.REPORTS_ENV, str(tmp_path / "reports"))
    suite = load_suite_doc("customer")
    suite["expectations"].append({"type": "expect_column_values_to_match_regex",
                                  "kwargs": {"column": "phone_raw", "regex": "^1[3-9][0-9]{9}$", "mostly": 0.9},
                                  "meta": {"severity": "critical"}})
    (root / "expectations" / "customer.json").write_text(json.dumps(suite), encoding="utf-8")
    return root


def customer(no: str, **overrides) -> dict:
    record = {"customer_no": no, "name": "吴敏", "mobile": "13912345678", "phone": None,
              "email": f"wu.min.{no.lower()}@example.com", "company": "北京华信科技有限公司", "city": "北京",
              "created_at": T0.isoformat(), "updated_at": T0.isoformat()}
    record.update(overrides)
    return record


def run_stages(conn, run_id: str, records: list[dict]):
    cfg = load_source("erp")
    stream = cfg.stream("customers")
    with conn.cursor() as cur:
        runlog.start(cur, run_id, "erp", cfg.dag_id, T0 - timedelta(days=1), T0)
        staging.copy_rows(cur, "stg.extracted", ["run_id", "source", "stream", "source_pk", "cursor_value", "payload"],
                          [(run_id, "erp", "customers", canonical_key(r["customer_no"]), T0, r) for r in records])
    conn.commit()
    resolve(conn, run_id, cfg)
    conn.commit()
    mapping.map_stream(conn, run_id, cfg, stream)
    conn.commit()
    outcome = validate_stream(conn, run_id, cfg, stream)
    conn.commit()
    return outcome


def text_of(page: str) -> str:
    """What a browser shows of an HTML page, roughly: the text between tags, spaces collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))


def assert_masked(text: str) -> None:
    for raw in RAW:
        assert raw not in text, f"{raw!r} shown in clear"


def test_the_report_names_the_failed_expectation_with_counts_and_masks_bad_emails_and_phones(
        conn, include, fresh_dsn, monkeypatch, capsys):
    run_id = "scheduled__2026-03-01T02:00:00+00:00"
    records = [customer(f"M{i:02d}") for i in range(30)]
    records[4]["email"] = "zhang.wei@"       # malformed: no domain
    records[9]["email"] = "li.na@163"        # malformed: no top-level domain
    records[12]["mobile"] = "1380013800"     # malformed: ten digits

    outcome = run_stages(conn, run_id, records)

    assert (outcome.quarantined, outcome.breaches) == (3, [])  # within the suites' mostly 0.9
    stored = report.stored(conn, run_id, "erp")
    html_path, json_path = Path(stored["html_path"]), Path(stored["json_path"])
    assert html_path == include.parent / "reports" / "erp" / "scheduled__2026-03-01T02_00_00_00_00" / "report.html"
    assert (stored["failed"], stored["quarantined"]) == (3, 3)

    doc = json.loads(json_path.read_text(encoding="utf-8"))
    assert doc["failed"] == [
        "customers: expect_column_values_to_match_regex(email) [critical, quarantined]: 2 of 30 rows",
        "customers: expect_column_values_to_match_regex(phone_raw) [critical, quarantined]: 1 of 30 rows",
        "customers: expect_column_values_to_be_in_set(phone_kind) [warning, recorded]: 1 of 30 rows"]
    checks = {(c["check"], c["column"]): c for c in doc["checks"]}
    email = checks[("expect_column_values_to_match_regex", "email")]
    # GX's verdict is success (within mostly 0.9), the stage's decision is what the report leads with
    assert (email["success"], email["decision"], email["unexpected_count"], email["element_count"], email["level"]) \
        == (True, "quarantined", 2, 30, "row")
    assert sorted(email["examples"]) == ["l***@163", "z***"]
    assert checks[("expect_column_values_to_match_regex", "phone_raw")]["examples"] == ["***3800"]
    assert checks[("expect_column_values_to_not_be_null", "source_pk")]["success"] is True
    groups = {(g["rule"], g["field"]): g for g in doc["quarantine"]["groups"]}
    assert groups[("expect_column_values_to_match_regex", "email")]["keys"] == 2
    assert groups[("expect_column_values_to_match_regex", "phone_raw")]["example_value"] == "***3800"
    assert doc["quarantine"]["keys"] == 3
    assert doc["data_docs"] == {"customers": "gx/customers.html"}

    page = html_path.read_text(encoding="utf-8")
    assert "expect_column_values_to_match_regex" in page and "<td class='n'>2</td><td class='n'>30</td>" in page
    assert "z***" in page and "l***@163" in page and "***3800" in page
    assert "<a href='gx/customers.html'>customers</a>" in page
    docs = (html_path.parent / "gx" / "customers.html").read_text(encoding="utf-8")
    shown = text_of(docs)
    assert "phone_raw Status Expectation Observed Value values must match this regular expression: ^1[3-9][0-9]{9}$ , " \
           "at least 90 % of the time. Unexpected Value Count ***3800 1" in shown
    assert "Unexpected Value Count l***@163 1 z*** 1" in shown
    for text in (page, json_path.read_text(encoding="utf-8"), docs,
                 (html_path.parent / "gx" / "customers.json").read_text(encoding="utf-8")):
        assert_masked(text)

    # `crm-sync report` rebuilds it (after the load, with its figures) and prints where it is
    monkeypatch.setenv("CRM_SYNC_DSN", fresh_dsn)
    assert main(["report", "--source", "erp"]) == 0
    assert capsys.readouterr().out.strip() == str(html_path)
    assert main(["report", "--source", "erp", "--run", run_id, "--json"]) == 0
    assert capsys.readouterr().out.strip() == str(json_path)
    assert main(["report", "--source", "nosuch"]) == 1
    assert "source 'nosuch' has no runs yet" in capsys.readouterr().err


def test_a_blocked_batch_has_its_report_before_the_task_fails(conn, include):
    run_id = "manual__blocked"
    records = [customer(f"B{i:02d}", email="not-an-address" if i % 3 == 0 else f"b{i}@example.com")
               for i in range(30)]

    with pytest.raises(DataQualityError):
        run_stages(conn, run_id, records)

    stored = report.stored(conn, run_id, "erp")  # committed with the evidence, before the raise
    doc = json.loads(Path(stored["json_path"]).read_text(encoding="utf-8"))
    assert doc["failed"][0] == ("customers: expect_column_values_to_match_regex(email) [critical, blocked]: "
                                "10 of 30 rows")
    assert doc["quarantine"]["keys"] == 10
    assert "n***" in Path(stored["html_path"]).read_text(encoding="utf-8")
    assert "not-an-address" not in Path(stored["html_path"]).read_text(encoding="utf-8")


def test_a_report_that_cannot_be_written_never_fails_the_validation(conn, include, monkeypatch, caplog):
    monkeypatch.setenv(report.REPORTS_ENV, "/proc/no-such-place")  # not writable
    outcome = run_stages(conn, "manual__noreport", [customer(f"N{i}") for i in range(5)])
    assert (outcome.rows, outcome.breaches) == (5, [])
    assert report.stored(conn, "manual__noreport", "erp") is None
    assert "quality report of erp (run manual__noreport) not built" in caplog.text
