"""HTTP that neither loops nor wastes paid calls: bad bodies, Retry-After dates, repeating paginators,
checkpoints and the per-run call budget, over real HTTP on loopback against the API simulators.

Each attempt is driven the way `extract.stage_pages` drives a resumable extractor: iterate
`records(window)`, take `checkpoint()` after every page (through JSON, as the checkpoint table
stores it), and on the next attempt or run `resume(state)` before `records(window)`.
"""
from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pytest
import requests
from requests.models import PreparedRequest

from crm_sync.config import load_source
from crm_sync.simulators.callcenter import CallCenterServer, CallCenterStore
from crm_sync.simulators.im import ImServer, ImStore
from crm_sync.simulators.people import generate_people
from crm_sync.simulators.ticketing import TicketingServer, TicketingStore
from crm_sync.sources.http_source import HttpExtractor, SourceRejected, SourceUnavailable, _retry_after
from crm_sync.watermark import Window

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
WINDOW = Window(since=None, until=NOW)
PEOPLE = generate_people(120, 17)
PAGE = 10
USERS = "/api/v2/users"


# --- simulators and the extractor ------------------------------------------------------------------

@pytest.fixture(scope="module")
def desk_server():
    token = secrets.token_urlsafe(16)
    with TicketingServer(TicketingStore.generate(PEOPLE, seed=17, now=NOW), token) as server:
        server.secret, server.login = token, None
        yield server


@pytest.fixture()
def desk(desk_server):
    desk_server.reset()
    yield desk_server
    desk_server.reset()


@pytest.fixture(scope="module")
def chat():
    key = secrets.token_urlsafe(16)
    with ImServer(ImStore.generate(PEOPLE, seed=17, now=NOW), key) as server:
        server.secret, server.login = key, None
        yield server


@pytest.fixture(scope="module")
def center():
    login, password = "cc-sync", secrets.token_urlsafe(12)
    with CallCenterServer(CallCenterStore.generate(PEOPLE, seed=17, now=NOW), login, password) as server:
        server.secret, server.login = password, login
        yield server


class RecordingSession(requests.Session):
    """Remembers every URL asked, exactly as sent."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def get(self, url, params=None, **kwargs):
        prepared = PreparedRequest()
        prepared.prepare_url(url, params)
        self.asked.append(prepared.url)
        return super().get(url, params=params, **kwargs)


def extractor(server, source: str = "ticketing", stream: str = "users", **http) -> HttpExtractor:
    cfg = load_source(source)
    options = {"page_size": PAGE, "backoff_seconds": 0.001, "max_attempts": 3, **http}
    cfg = cfg.model_copy(update={"http": cfg.http.model_copy(update=options)})
    ex = HttpExtractor(cfg, cfg.stream(stream), RecordingSession(), server.base_url, server.login, server.secret)
    ex.waits = []
    ex.sleep = ex.waits.append
    return ex


@dataclass
class Attempt:
    pages: list[list[dict]] = field(default_factory=list)
    state: dict | None = None
    error: Exception | None = None
    asked: list[str] = field(default_factory=list)
    ex: HttpExtractor | None = None

    def ids(self, key: str = "id") -> list[str]:
        return [r[key] for page in self.pages for r in page]


def attempt(ex: HttpExtractor, resume: dict | None = None) -> Attempt:
    """One extract attempt as `stage_pages` runs it; the checkpoint goes through JSON like the jsonb column."""
    got = Attempt(state=resume, ex=ex)
    if resume is not None:
        ex.resume(resume)
    try:
        for records in ex.records(WINDOW):
            got.pages.append(records)
            got.state = json.loads(json.dumps(ex.checkpoint()))
        if ex.partial:
            got.state = json.loads(json.dumps(ex.checkpoint()))
    except (SourceUnavailable, SourceRejected) as exc:
        got.error = exc
    finally:
        got.asked = list(ex.session.asked)
        ex.close()
    return got


def users(server) -> list[str]:
    return sorted(u["id"] for u in server.store.users)


def pages_of(n: int) -> int:
    return math.ceil(n / PAGE)


# --- bodies that are not the declared JSON shape ----------------------------------------------------

BAD_BODIES = {
    # fault: (what the error says was wrong, status the client counts for it)
    "malformed_json": ("HTTP 200 but the body is not JSON (application/json", "200"),
    "html": ("HTTP 200 but the body is not JSON (text/html", "200"),
    "json_list": ("HTTP 200 but records_path 'data' selects nothing, not a list of records; "
                  "the body is a JSON list of 1 items", "200"),
    "cut": ("the connection was cut inside the body (a truncated response) (ChunkedEncodingError",
            "ChunkedEncodingError"),
}


@pytest.mark.parametrize("kind", list(BAD_BODIES))
def test_a_bad_body_now_and_then_is_retried_and_every_record_arrives_once(desk, kind):
    desk.set_faults(bad_body=kind, bad_body_every=3)
    got = attempt(extractor(desk))
    assert got.error is None and not got.ex.partial
    assert sorted(got.ids()) == users(desk) and len(got.ids()) == len(set(got.ids()))
    pages = pages_of(len(users(desk)))
    bad = desk.stats()["calls"] - pages
    assert bad == len(got.ex.waits) > 0  # one backoff per bad body
    assert got.ex.calls == desk.stats()["calls"] == len(got.asked) == pages + bad
    assert got.ex.by_status == {"200": pages + bad} if kind != "cut" else {"200": pages, "ChunkedEncodingError": bad}


@pytest.mark.parametrize("kind", list(BAD_BODIES))
def test_a_body_that_stays_bad_fails_naming_source_stream_endpoint_page_and_what_was_wrong(desk, kind):
    desk.set_faults(bad_body=kind, bad_body_from=3)
    got = attempt(extractor(desk, max_attempts=3))
    assert type(got.error) is SourceUnavailable  # never a raw JSONDecodeError / KeyError / ChunkedEncodingError
    message = str(got.error)
    assert message.startswith(f"source 'ticketing' stream 'users': GET {USERS} page 3 failed after 3 attempts; "
                              "last error: ")
    problem, status = BAD_BODIES[kind]
    assert problem in message and "Nothing was loaded" in message and desk.secret not in message
    assert len(got.pages) == 2 and got.state["pages"] == 2  # the two good pages were handed over and checkpointed
    assert got.ex.calls == desk.stats()["calls"] == 2 + 3 and got.ex.by_status[status] >= 3


def test_records_path_selecting_no_list_is_retried_then_named(desk):
    got = attempt(extractor(desk, records_path="next_cursor", max_attempts=2))
    assert type(got.error) is SourceUnavailable
    assert (f"GET {USERS} page 1 failed after 2 attempts; last error: HTTP 200 but records_path 'next_cursor' "
            "selects a JSON str, not a list of records; the body is an object with keys ['data', 'next_cursor']"
            ) in str(got.error)
    assert got.ex.calls == desk.stats()["calls"] == 2 and got.ex.waits and got.pages == []


# --- Retry-After, both RFC 9110 forms -------------------------------------------------------------

def test_retry_after_parses_delta_seconds_and_http_dates():
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=timezone.utc)
    assert _retry_after("120", 1.0, now) == 120
    assert _retry_after("Wed, 21 Oct 2015 07:28:30 GMT", 1.0, now) == 30
    assert _retry_after("Wednesday, 21-Oct-15 07:29:00 GMT", 1.0, now) == 60  # obsolete RFC 850 form
    assert _retry_after("Wed, 21 Oct 2015 07:00:00 GMT", 1.0, now) == 0     # in the past: at once
    assert _retry_after("-5", 1.0, now) == 0
    assert _retry_after("soon", 1.5, now) == 1.5 and _retry_after(None, 1.5, now) == 1.5
    assert _retry_after("", 1.5, now) == 1.5


@pytest.mark.parametrize("as_date", [False, True], ids=["delta_seconds", "http_date"])
def test_429_waits_as_retry_after_says_and_each_wait_is_a_counted_call(desk, as_date):
    desk.set_faults(rate_limit_every=3, retry_after_seconds=4, retry_after_date=as_date)
    got = attempt(extractor(desk, max_attempts=3))
    assert got.error is None and sorted(got.ids()) == users(desk)
    limited = desk.stats()["by_endpoint"][USERS]["429"]
    assert got.ex.by_status == {"200": pages_of(len(users(desk))), "429": limited} and len(got.ex.waits) == limited
    if as_date:  # a date to the second, read on the client's clock: a little under 4 s
        assert all(2.5 < wait <= 4.0 for wait in got.ex.waits), got.ex.waits
    else:
        assert set(got.ex.waits) == {4.0}


@pytest.mark.parametrize("as_date", [False, True], ids=["delta_seconds", "http_date"])
def test_retry_after_is_capped_and_a_past_date_means_at_once(desk, as_date):
    desk.set_faults(rate_limit_every=2, retry_after_seconds=3600, retry_after_date=as_date)
    got = attempt(extractor(desk, max_retry_after_seconds=2.5))
    assert got.error is None and set(got.ex.waits) == {2.5}

    desk.reset()
    desk.set_faults(rate_limit_every=2, retry_after_seconds=-30, retry_after_date=as_date)
    got = attempt(extractor(desk))
    assert got.error is None and set(got.ex.waits) == {0.0} and sorted(got.ids()) == users(desk)


# --- paginators that repeat themselves -------------------------------------------------------------

def test_a_cursor_that_never_advances_fails_after_one_repeat(desk):
    desk.set_faults(cursor_stuck=True)
    got = attempt(extractor(desk))
    assert type(got.error) is SourceRejected
    message = str(got.error)
    assert message.startswith(f"source 'ticketing' stream 'users': GET {USERS} page 2: the API repeated cursor '")
    assert message.endswith("paging would never end; 2 calls made")
    assert len(got.pages) == 1 and got.ex.calls == desk.stats()["calls"] == 2


def test_a_fresh_cursor_that_serves_the_same_page_again_fails_after_one_repeat(desk):
    desk.set_faults(cursor_replays=True)
    got = attempt(extractor(desk))
    assert type(got.error) is SourceRejected
    assert str(got.error) == (f"source 'ticketing' stream 'users': GET {USERS} page 3: the API repeated the same "
                              f"{PAGE} records although the cursor moved on: paging would never end; 3 calls made")
    assert len(got.pages) == 2 and got.ex.calls == desk.stats()["calls"] == 3
    assert len(set(got.asked)) == 3  # three different cursors were asked for


# --- the window's count ----------------------------------------------------------------------------

def test_total_path_reads_the_window_count_from_the_first_page(desk):
    desk.set_faults(first_page_total=True)
    got = attempt(extractor(desk, total_path="total"))
    assert got.error is None and got.ex.source_total == len(users(desk)) == len(got.ids())
    assert got.state["total"] == len(users(desk))

    desk.reset()  # the API stopped sending it: the body is not the declared shape
    got = attempt(extractor(desk, total_path="total", max_attempts=2))
    assert type(got.error) is SourceUnavailable
    assert f"GET {USERS} page 1 failed after 2 attempts; last error: HTTP 200 but total_path 'total' selects " \
           "nothing, not a count" in str(got.error)


# --- checkpoints: a retry resumes after the last committed page ---------------------------------------

def _request_of(state: dict) -> str:
    nxt = state["next"]
    prepared = PreparedRequest()
    prepared.prepare_url(nxt["url"], nxt["params"])
    return prepared.url


PAGINATORS = {
    # paginator: (server fixture, source, stream, key field)
    "cursor": ("desk", "ticketing", "users", "id"),
    "page_number": ("chat", "im", "contacts", "external_userid"),
    "link_header": ("center", "callcenter", "calls", "call_id"),
}


@pytest.mark.parametrize("paginator", [*PAGINATORS, "offset"])
def test_a_retry_after_a_failure_mid_paging_asks_for_no_committed_page_again(request, paginator):
    fixture, source, stream, key = PAGINATORS.get(paginator, PAGINATORS["link_header"])
    server = request.getfixturevalue(fixture)
    server.reset()
    http = {"paginator": load_source(source).http.paginator}
    if paginator == "offset":  # the call center also speaks offset/limit with X-Total-Count
        http["paginator"] = http["paginator"].model_copy(update={"type": "offset"})
    server.set_faults(bad_body="html", bad_body_from=4)
    try:
        first = attempt(extractor(server, source, stream, max_attempts=2, **http))
        assert type(first.error) is SourceUnavailable and "page 4 failed after 2 attempts" in str(first.error)
        assert len(first.pages) == 3 and first.state["pages"] == 3
        server.reset()  # the API recovers; Airflow retries the task, which resumes from the checkpoint
        second = attempt(extractor(server, source, stream, **http), resume=first.state)
    finally:
        server.reset()
    assert second.error is None and not second.ex.partial
    assert second.asked[0] == _request_of(first.state)  # straight to page 4
    committed = set(first.asked[:3])
    assert not committed & set(second.asked) and len(set(second.asked)) == len(second.asked)
    got = first.ids(key) + second.ids(key)
    assert len(got) == len(set(got)) == second.state["received"]  # every record once
    assert len(got) > 4 * PAGE  # the window had pages left after the failure
    assert second.state["next"] is None


def test_resuming_a_finished_checkpoint_asks_for_nothing(desk):
    done = attempt(extractor(desk))
    assert done.state["next"] is None
    again = attempt(extractor(desk), resume=done.state)
    assert again.pages == [] and again.asked == [] and again.ex.calls == 0


def test_a_checkpoint_for_another_endpoint_reads_the_window_from_the_start(desk):
    ex = extractor(desk)
    first = attempt(ex)
    moved = {**first.state, "endpoint": "/api/v1/users", "next": {"url": desk.base_url + "/api/v1/users",
                                                                  "params": {"cursor": "x"}}}
    again = attempt(extractor(desk), resume=moved)
    assert sorted(again.ids()) == users(desk) and again.asked[0] == first.asked[0]


# --- the call budget ---------------------------------------------------------------------------------

def test_a_spent_budget_ends_the_run_partial_and_the_next_runs_fetch_the_rest(desk):
    desk.set_faults(first_page_total=True)
    everyone = users(desk)
    runs, state = [], None
    while True:
        run = attempt(extractor(desk, max_calls_per_run=3, total_path="total"), resume=state)
        assert run.error is None
        runs.append(run)
        if not run.ex.partial:
            break
        state = run.state
        assert state["partial"] is True and state["next"] is not None and run.ex.calls == 3 == len(run.pages)
        assert len(runs) < 10
    pages = pages_of(len(everyone))
    assert len(runs) == math.ceil(pages / 3)
    got = [r for run in runs for r in run.ids()]
    assert sorted(got) == everyone and len(got) == len(set(got))
    asked = [url for run in runs for url in run.asked]
    assert len(asked) == len(set(asked)) == pages == desk.stats()["calls"]  # no page asked twice
    # each run expects what the window's count left: the first the whole window, each later one the rest
    received = 0
    for run in runs:
        assert run.ex.source_total == len(everyone) - received
        received += len(run.ids())


def test_retries_count_against_the_budget(desk):
    desk.set_faults(rate_limit_every=2)  # every second call is a 429
    got = attempt(extractor(desk, max_calls_per_run=5))
    assert got.error is None and got.ex.partial
    assert got.ex.calls == desk.stats()["calls"] == 5 and got.ex.by_status == {"200": 3, "429": 2}
    assert len(got.pages) == 3 and got.state["pages"] == 3 and got.state["calls"] == 5
    assert got.ex.notices == []  # it stopped between pages, not while one was failing


def test_a_budget_spent_while_a_page_fails_stops_partial_and_says_why(desk):
    desk.set_faults(bad_body="html", bad_body_from=3)
    got = attempt(extractor(desk, max_calls_per_run=4, max_attempts=5))
    assert got.error is None and got.ex.partial and len(got.pages) == 2 and got.ex.calls == 4
    assert got.state["next"] is not None and got.state["pages"] == 2
    [notice] = got.ex.notices
    assert notice.startswith(f"source 'ticketing' stream 'users': GET {USERS} page 3: the call budget ran out "
                             "while this page was failing (last error: HTTP 200 but the body is not JSON (text/html")


def test_a_budget_that_suffices_is_not_partial(desk):
    pages = pages_of(len(users(desk)))
    got = attempt(extractor(desk, max_calls_per_run=pages))
    assert got.error is None and not got.ex.partial and got.ex.calls == pages
    assert sorted(got.ids()) == users(desk)


def test_a_retried_attempt_of_the_same_run_spends_what_is_left_of_its_budget(desk):
    desk.set_faults(first_page_total=True, bad_body="cut", bad_body_from=3)
    first = attempt(extractor(desk, max_calls_per_run=6, max_attempts=2, total_path="total"))
    # the checkpoint after page 2 holds the 2 calls made so far; the failed calls after it are not in it
    assert type(first.error) is SourceUnavailable and first.ex.calls == 4 and first.state["calls"] == 2
    assert first.state["partial"] is False
    desk.reset()
    second = attempt(extractor(desk, max_calls_per_run=6, total_path="total"), resume=first.state)
    assert second.error is None and second.ex.partial and second.ex.calls == 4 and len(second.pages) == 4
    assert second.ex.source_total == len(users(desk))  # kept from the state: page 1 is not read again
    assert not set(first.asked[:2]) & set(second.asked)


# --- the simulator's knobs over HTTP ---------------------------------------------------------------

def test_the_fault_knobs_switch_over_http_and_default_to_a_well_behaved_api(desk):
    auth = {"Authorization": f"Bearer {desk.secret}"}

    def get(**params):
        return requests.get(desk.base_url + USERS, params={"updated_before": NOW.isoformat(), "limit": PAGE, **params},
                            headers=auth, timeout=5)

    first = get()
    assert first.status_code == 200 and set(first.json()) == {"data", "next_cursor"}  # no `total` by default
    bad = requests.post(desk.base_url + "/_admin/faults", json={"bad_body": "xml"}, headers=auth, timeout=5)
    assert bad.status_code == 400 and "bad_body must be one of" in bad.json()["error"]
    knobs = {"bad_body": "json_list", "bad_body_every": 2, "first_page_total": True, "cursor_stuck": True,
             "retry_after_date": True}
    answer = requests.post(desk.base_url + "/_admin/faults", json=knobs, headers=auth, timeout=5)
    assert answer.status_code == 200 and {k: answer.json()[k] for k in knobs} == knobs
    assert get().json() == [{"error": "maintenance"}]                       # request 2: a list, not an object
    body = get().json()                                                       # request 3: the first page again
    assert body["total"] == len(users(desk)) and body["data"] == first.json()["data"]
    assert get().status_code == 200                                           # (request 4: the bad one)
    stuck = get(cursor=body["next_cursor"]).json()
    assert stuck["next_cursor"] == body["next_cursor"] and "total" not in stuck
