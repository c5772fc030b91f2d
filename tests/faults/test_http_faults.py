"""Faults of an API source (the ticketing desk simulator, behind an `HttpFront` where answers are bent).

Bad records (a NUL character, an object where a string belongs) must be quarantined with the field
while the rest loads; a record edited while the sync pages arrives twice and its newest version
loads; bad pages (truncated JSON, an HTML page with HTTP 200) are retried and then
fail naming source, stream, endpoint and page, and the Airflow retry resumes after the last
committed page; a cursor that never advances fails after one repeat; a `Retry-After` HTTP date is
honoured; a call budget ends the run "partial" and the next run resumes. After healing, every record
the API holds is accounted for: none lost, none duplicated.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from faults.harness import END, FIX, HOUR, store_rows
from faults.proxy import Answer

pytestmark = pytest.mark.integration

FIRST = (END - HOUR, END)      # the ticketing desk runs hourly; its first run reads the whole history
NEXT = (END, END + HOUR)
USERS, TICKETS = "/api/v2/users", "/api/v2/tickets"


def settled(case, fault_counts, desk, windows):
    with desk.store.lock:
        rows = store_rows({"users": [dict(u) for u in desk.store.users],
                           "tickets": [dict(t) for t in desk.store.tickets]})
    acc = case.account("ticketing", windows, rows=rows)
    fault_counts(acc)
    assert (acc.lost, acc.duplicated) == (0, 0), str(acc)
    return acc


def fix(desk, user_id: str, **fields) -> None:
    """The desk's agent corrects a record (its `updated_at` moves, as on the real desk)."""
    with desk.store.lock:
        user = next(u for u in desk.store.users if u["id"] == user_id)
        user.update(fields, updated_at=FIX.isoformat())


def quarantined(case, run_id: str, key: str) -> list[tuple]:
    return case.crm("select stage, field, reason, blocks_key from sync.quarantine "
                    "where run_id = %s and source = 'ticketing' and source_pk = %s", (run_id, key))


def test_a_record_with_a_nul_character_is_quarantined_and_the_rest_of_the_page_loads(case, fault_counts):
    desk = case.ticketing()
    bad = desk.store.users[0]
    bad["name"] = "张\x00伟"
    ticketing = case.pipeline("ticketing")

    run = ticketing.run(*FIRST)

    assert run.ok, run.error_text
    [(stage, field, reason, blocks)] = quarantined(case, run.run_id, bad["id"])
    assert (stage, field, blocks) == ("extract", "name", True) and "NUL character" in reason
    assert case.crm("select count(*) from crm.source_customer where source = 'ticketing'")[0][0] == \
        len(desk.store.users) - 1
    fix(desk, bad["id"], name="张伟")
    assert ticketing.run(*NEXT).ok
    assert case.crm("select full_name from crm.source_customer where source_id = %s", (bad["id"],)) == [("张伟",)]
    settled(case, fault_counts, desk, [(None, NEXT[1])])


def test_an_object_where_a_string_is_expected_is_quarantined_naming_the_field(case, fault_counts):
    desk = case.ticketing()
    bad = desk.store.users[1]
    bad["organization"] = {"name": "北京华信科技有限公司", "id": 7}
    ticketing = case.pipeline("ticketing")

    run = ticketing.run(*FIRST)

    assert run.ok, run.error_text
    stored = case.crm("select company from crm.source_customer where source_id = %s", (bad["id"],))
    assert not any(c and c.startswith("{") for (c,) in stored), f"the object was stored as text: {stored}"
    rows = quarantined(case, run.run_id, bad["id"])
    assert [(stage, field, blocks) for stage, field, _, blocks in rows] == [("map", "organization", True)], rows
    assert "object" in rows[0][2]
    fix(desk, bad["id"], organization="北京华信科技有限公司")
    assert ticketing.run(*NEXT).ok
    assert case.crm("select company from crm.source_customer where source_id = %s", (bad["id"],)) == \
        [("北京华信科技有限公司",)]
    settled(case, fault_counts, desk, [(None, NEXT[1])])


def test_a_record_updated_while_the_sync_pages_arrives_twice_and_the_newest_version_loads(case, fault_counts):
    case.patch_source("ticketing", http={"page_size": 20})
    desk = case.ticketing(front=True, people=120)
    store = desk.store
    edited = sorted(store.users, key=lambda u: (u["updated_at"].replace("Z", "+00:00"), u["id"]))[0]

    def agent_edits_page_1_record(call):  # while page 2 is asked for: the record moves to the last page
        if call.path == USERS and "cursor" in call.query and not edited["name"].endswith("（改）"):
            with store.lock:
                edited.update(name=edited["name"] + "（改）", updated_at=(END - timedelta(minutes=1)).isoformat())
        return None

    desk.front.rule = agent_edits_page_1_record
    ticketing = case.pipeline("ticketing")

    run = ticketing.run(*FIRST)

    assert run.ok, run.error_text
    rows = quarantined(case, run.run_id, edited["id"])
    assert [(stage, blocks) for stage, _, _, blocks in rows] == [("extract", False)], rows
    assert rows[0][2].startswith("superseded: a newer version of this key")
    [(name, updated)] = case.crm("select full_name, source_updated_at from crm.source_customer where source_id = %s",
                                 (edited["id"],))
    assert "改" in name and updated == END - timedelta(minutes=1)
    assert ticketing.run(*NEXT).ok
    settled(case, fault_counts, desk, [(None, NEXT[1])])


def test_a_malformed_json_page_is_retried_then_fails_naming_the_page_and_the_retry_resumes_there(case, fault_counts):
    case.patch_source("ticketing", http={"page_size": 20})
    desk = case.ticketing(front=True, people=120)
    front = desk.front
    front.rule = lambda call: (Answer(200, '{"data": [{"id": "u-0000', content_type="application/json")
                               if call.path == USERS and "cursor" in call.query else None)
    ticketing = case.pipeline("ticketing")

    run = ticketing.run(*FIRST)

    assert run.failed_task == "extract.users" and run.retryable
    assert run.error_text.startswith("SourceUnavailable: source 'ticketing' stream 'users': GET /api/v2/users page 2 "
                                     "failed after 3 attempts; last error: HTTP 200 but the body is not JSON"), \
        run.error_text
    assert len([c for c in front.data_calls(USERS) if "cursor" in c.query]) == 3
    front.reset()  # the API is well again; Airflow retries the task
    retry = run.retry()
    assert retry.ok, retry.error_text
    settled(case, fault_counts, desk, [(None, END)])
    first_pages = [c for c in front.data_calls(USERS) if "cursor" not in c.query]
    assert first_pages == [], "the retry read page 1 again instead of resuming after the committed page"


def test_an_html_page_with_http_200_is_retried_then_fails_and_heals(case, fault_counts):
    desk = case.ticketing(front=True)
    front = desk.front
    front.rule = lambda call: (Answer(200, "<html><body><h1>Scheduled maintenance</h1></body></html>",
                                      content_type="text/html; charset=utf-8") if call.path == TICKETS else None)
    ticketing = case.pipeline("ticketing")

    run = ticketing.run(*FIRST)

    assert run.failed_task == "extract.tickets" and run.retryable
    assert run.error_text.startswith("SourceUnavailable: source 'ticketing' stream 'tickets': GET /api/v2/tickets "
                                     "page 1 failed after 3 attempts; last error: HTTP 200 but the body is not JSON "
                                     "(text/html"), run.error_text
    assert "Scheduled maintenance" in run.error_text
    assert case.crm("select count(*) from crm.source_customer")[0][0] == 0
    front.reset()
    retry = run.retry()
    assert retry.ok, retry.error_text
    settled(case, fault_counts, desk, [(None, END)])


def test_a_cursor_that_never_advances_fails_after_one_repeat(case, fault_counts):
    case.patch_source("ticketing", http={"page_size": 20})
    desk = case.ticketing(front=True, people=120)
    front = desk.front

    def stuck(call):  # page 2 and later: the API hands back the cursor it was given
        if call.path == USERS and "cursor" in call.query:
            return lambda body: {**body, "next_cursor": call.query["cursor"]}
        return None

    front.rule = stuck
    ticketing = case.pipeline("ticketing")

    run = ticketing.run(*FIRST)

    assert run.failed_task == "extract.users" and not run.retryable  # retrying would loop again: fail fast
    assert run.error_text.startswith("SourceRejected: source 'ticketing' stream 'users': GET /api/v2/users page 2: "
                                     "the API repeated cursor "), run.error_text
    assert "paging would never end" in run.error_text
    assert len(front.data_calls(USERS)) == 2, "every call after the repeat is billed for nothing"
    front.reset()  # the vendor fixed its API; on-call clears the task
    retry = run.retry()
    assert retry.ok, retry.error_text
    settled(case, fault_counts, desk, [(None, END)])


def test_retry_after_as_an_http_date_is_waited_for(case, fault_counts):
    desk = case.ticketing(front=True)
    front = desk.front

    def rate_limited(call):  # the first call: "come back at <date 2-3 s from now>" (HTTP dates have whole seconds)
        if call.number != 1:
            return None
        until = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=3)
        return Answer(429, '{"error": "rate limit exceeded", "status": 429}',
                      headers={"Retry-After": format_datetime(until, usegmt=True)})

    front.rule = rate_limited
    ticketing = case.pipeline("ticketing")

    run = ticketing.run(*FIRST)

    assert run.ok, run.error_text
    first, second = front.data_calls()[:2]
    assert first.status == 429 and second.path == first.path and second.query == first.query
    settled(case, fault_counts, desk, [(None, END)])
    waited = second.at - first.at
    assert waited >= 1.5, f"the retry came {waited:.2f}s after a 429 whose Retry-After date was 2-3 s ahead"


def test_a_per_run_call_budget_ends_the_run_partial_and_the_next_run_resumes(case, fault_counts):
    case.patch_source("ticketing", http={"page_size": 20, "max_calls_per_run": 3})
    desk = case.ticketing(front=True, people=120)
    front = desk.front
    ticketing = case.pipeline("ticketing")
    states, runs = [], []
    for hour in range(6):
        front.reset()
        run = ticketing.run(END + (hour - 1) * HOUR, END + hour * HOUR)
        assert run.ok, run.error_text
        runs.append(run)
        states.append(case.run_log(run.run_id, "ticketing")["state"])
        calls = {path: len(front.data_calls(path)) for path in (USERS, TICKETS)}
        assert max(calls.values()) <= 3, f"run {hour + 1} made {calls} calls with a budget of 3 per stream"
        if states[-1] == "success":
            break

    assert states[0] == "partial" and states[-1] == "success", states
    assert any("the call budget of 3 calls per run was spent" in body for _, body in case.alerts)
    settled(case, fault_counts, desk, [(None, runs[-1].context["data_interval_end"])])
