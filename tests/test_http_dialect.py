"""The HTTP dialect is data: one `fetch_pages` reads cursor, page-number, offset and Link-header APIs
with bearer, API-key, Basic or no auth, as `HttpOptions` declares — over real HTTP on loopback."""
from __future__ import annotations

import base64
import json
import logging
import math
import secrets
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import requests

from crm_sync.config import ConfigError, HttpOptions
from crm_sync.sources.http_source import CallStats, SourceRejected, SourceUnavailable, fetch_pages

BASE = datetime(2025, 3, 1, tzinfo=timezone.utc)
FAR = datetime(2030, 1, 1, tzinfo=timezone.utc)
RECORDS = [{"id": f"r-{i:03d}", "name": f"record {i}", "updated_at": (BASE + timedelta(minutes=i)).isoformat()}
           for i in range(250)]
ALL_IDS = [r["id"] for r in RECORDS]
SECRET = "s3cret-" + secrets.token_urlsafe(12)


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class _Handler(BaseHTTPRequestHandler):
    """Serves RECORDS in several dialects; the window params differ by path, as they do between real APIs."""

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802
        api: Api = self.server.api
        parts = urlsplit(self.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        with api.lock:
            api.log.append({"path": parts.path, "query": query, "headers": dict(self.headers)})
            number = len(api.log)
        if api.auth is not None:
            header, expected = api.auth
            presented = self.headers.get(header)
            if presented != expected:  # echoes what it got, as careless APIs do: the client must redact it
                return self._json(401, {"error": "bad credentials", "presented": presented})
        fault = api.faults.get(number)
        if fault == "html":
            return self._raw(200, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
        if fault == "json_cut":
            return self._raw(200, b'{"data": [{"id": "r-0', "application/json")
        if fault == "body_cut":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "5000")
            self.end_headers()
            self.wfile.write(b'{"data": [{"id": "r-000", ')
            self.close_connection = True
            return None
        route = getattr(self, "_route_" + parts.path.strip("/").replace("/", "_"), None)
        if route is None:
            return self._json(404, {"error": f"no route {parts.path}"})
        return route(query)

    # --- dialects ---------------------------------------------------------------------------------

    def _window(self, query: dict, since: str, until: str | None) -> list[dict]:
        lo = _ts(query[since]) if since in query else None
        hi = _ts(query[until]) if until and until in query else None
        return [r for r in RECORDS
                if (lo is None or _ts(r["updated_at"]) >= lo) and (hi is None or _ts(r["updated_at"]) < hi)]

    def _route_v2_items(self, q: dict):
        """Today's desk: updated_since/updated_before/limit, opaque cursor, {"data", "next_cursor"}."""
        records = self._window(q, "updated_since", "updated_before")
        start = int(base64.b64decode(q["cursor"]).decode()) if q.get("cursor") else 0
        limit = int(q.get("limit", 100))
        page = records[start:start + limit]
        more = start + limit < len(records)
        cursor = base64.b64encode(str(start + limit).encode()).decode() if more else None
        return self._json(200, {"data": page, "next_cursor": cursor})

    def _route_pages(self, q: dict):
        """page/per_page from 1, {"result": {"items", "total_pages"}}, window param modified_since only."""
        records = self._window(q, "modified_since", None)
        size, page = int(q.get("per_page", 25)), int(q.get("page", 1))
        items = records[(page - 1) * size:page * size]
        return self._json(200, {"result": {"items": items, "total_pages": math.ceil(len(records) / size)}})

    def _route_offset(self, q: dict):
        """offset/limit, {"items": [...]}, the total in X-Total-Count."""
        records = self._window(q, "from", "to")
        offset, limit = int(q.get("offset", 0)), int(q.get("limit", 20))
        return self._json(200, {"items": records[offset:offset + limit]}, {"X-Total-Count": str(len(records))})

    def _route_link(self, q: dict):
        """A bare JSON list; the next page in an RFC 8288 Link header that repeats every query param."""
        records = self._window(q, "since", "until")
        size, page = int(q.get("size", 30)), int(q.get("page", 1))
        headers = {}
        if page * size < len(records):
            base, nxt = self.server.api.base_url, urlencode({**q, "page": page + 1})
            headers["Link"] = f'<{base}/link?{nxt}>; rel="next", <{base}/link>; rel="first"'
        return self._json(200, records[(page - 1) * size:page * size], headers)

    def _route_loop_cursor(self, q: dict):
        return self._json(200, {"data": RECORDS[:1], "next_cursor": "again"})

    def _route_loop_link(self, q: dict):
        return self._json(200, RECORDS[:1], {"Link": f'<{self.server.api.base_url}/loop/link?page=2>; rel="next"'})

    def _route_loop_pages(self, q: dict):
        """Ignores `page`: the same full page forever."""
        return self._json(200, {"result": {"items": RECORDS[:int(q.get("per_page", 25))]}})

    def _route_elsewhere(self, q: dict):
        return self._json(200, RECORDS[:1], {"Link": '<http://collector.example/steal?page=2>; rel="next"'})

    def _route_mixed(self, q: dict):
        return self._json(200, {"data": [RECORDS[0], 42, "oops", RECORDS[1]], "next_cursor": None})

    # --- responses ----------------------------------------------------------------------------------

    def _json(self, status: int, body, headers: dict | None = None):
        return self._raw(status, json.dumps(body).encode(), "application/json", headers)

    def _raw(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class Api:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.api = self
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="dialect-api", daemon=True)
        self.reset()

    def reset(self) -> None:
        self.log: list[dict] = []
        self.auth: tuple[str, str] | None = None   # (header, exact value) the data paths demand
        self.faults: dict[int, str] = {}           # request number (1-based since reset) -> fault

    def queries(self) -> list[dict]:
        return [entry["query"] for entry in self.log]


@pytest.fixture(scope="module")
def server():
    api = Api()
    api.thread.start()
    yield api
    api.server.shutdown()
    api.server.server_close()


@pytest.fixture()
def api(server):
    server.reset()
    yield server
    server.reset()


def fetch(api: Api, endpoint: str, options: HttpOptions, *, login=None, password=SECRET, since=None, until=FAR,
          extra_params=None, stats: CallStats | None = None, session=None, sleep=None) -> list[list[dict]]:
    stats = stats if stats is not None else CallStats()
    own = session is None
    session = session or requests.Session()
    try:
        return list(fetch_pages(session, api.base_url, endpoint, options=options, login=login, password=password,
                                source="desk", stream="items", since=since, until=until, extra_params=extra_params,
                                stats=stats, sleep=sleep or (lambda s: None)))
    finally:
        if own:
            session.close()


def ids(pages: list[list[dict]]) -> list[str]:
    return [r["id"] for page in pages for r in page]


# --- paginators -----------------------------------------------------------------------------------

def test_default_options_make_exactly_the_desk_requests(api):
    stats = CallStats()
    pages = fetch(api, "/v2/items", HttpOptions(page_size=40), stats=stats)
    assert ids(pages) == ALL_IDS
    assert stats.calls == len(api.log) == 7 and stats.by_status == {"200": 7}
    first, second = api.queries()[:2]
    assert first == {"updated_before": FAR.isoformat(), "limit": "40"}
    assert set(second) == {"updated_before", "limit", "cursor"}
    assert all(entry["headers"]["Authorization"] == f"Bearer {SECRET}" for entry in api.log)
    assert all(entry["headers"]["Accept"] == "application/json" for entry in api.log)


PAGINATED = {
    # name: (endpoint, options, calls expected)
    "cursor": ("/v2/items", HttpOptions(page_size=33), 8),
    "page_number+total_pages": (
        "/pages", HttpOptions(page_size=50, records_path="result.items",
                              params={"since": "modified_since", "until": None, "page_size": "per_page"},
                              paginator={"type": "page_number", "total_pages_path": "result.total_pages"}), 5),
    "page_number+empty_page": (
        "/pages", HttpOptions(page_size=50, records_path="result.items",
                              params={"since": "modified_since", "until": None, "page_size": "per_page"},
                              paginator={"type": "page_number"}), 6),
    "page_number+short_page": (
        "/pages", HttpOptions(page_size=40, records_path="result.items",
                              params={"since": "modified_since", "until": None, "page_size": "per_page"},
                              paginator={"type": "page_number"}), 7),
    "offset+x_total_count": (
        "/offset", HttpOptions(page_size=50, records_path="items", params={"since": "from", "until": "to"},
                               paginator={"type": "offset"}), 5),
    "offset+short_page": (
        "/offset", HttpOptions(page_size=60, records_path="items", params={"since": "from", "until": "to"},
                               paginator={"type": "offset"}), 5),
    "link_header": (
        "/link", HttpOptions(page_size=100, records_path="", params={"since": "since", "until": "until",
                                                                     "page_size": "size"},
                             paginator={"type": "link_header"}), 3),
}


@pytest.mark.parametrize("name", list(PAGINATED))
def test_every_paginator_reads_every_record_exactly_once(api, name):
    endpoint, options, calls = PAGINATED[name]
    stats = CallStats()
    pages = fetch(api, endpoint, options, stats=stats)
    assert ids(pages) == ALL_IDS  # each exactly once, in order
    assert stats.calls == len(api.log) == calls  # the paginator stops without a wasted call where it can


@pytest.mark.parametrize("name", ["cursor", "page_number+total_pages", "offset+x_total_count", "link_header"])
def test_fixed_params_go_with_every_request_and_since_only_when_bounded(api, name):
    endpoint, options, _ = PAGINATED[name]
    since_name = options.params.since

    fetch(api, endpoint, options, extra_params={"status": "closed"})
    assert all(q["status"] == "closed" for q in api.queries())
    assert not any(since_name in q for q in api.queries())

    api.reset()
    since = _ts(RECORDS[200]["updated_at"])
    pages = fetch(api, endpoint, options, since=since, extra_params={"status": "closed"})
    assert ids(pages) == ALL_IDS[200:]
    assert all(q["status"] == "closed" and _ts(q[since_name]) == since for q in api.queries())


def test_fixed_params_may_not_shadow_the_dialect_params(api):
    with pytest.raises(ConfigError, match=r"stream 'items'.*\['cursor', 'limit'\]"):
        fetch(api, "/v2/items", HttpOptions(), extra_params={"limit": "5", "cursor": "x", "status": "open"})
    assert api.log == []


# --- auth -----------------------------------------------------------------------------------------

BASIC = "Basic " + base64.b64encode(f"svc:{SECRET}".encode()).decode()
AUTH = {
    # auth option: (header the API demands, its value)
    "bearer": ({"type": "bearer"}, ("Authorization", f"Bearer {SECRET}")),
    "api_key": ({"type": "api_key", "header": "X-Desk-Key"}, ("X-Desk-Key", SECRET)),
    "basic": ({"type": "basic"}, ("Authorization", BASIC)),
    "none": ({"type": "none"}, None),
}


@pytest.mark.parametrize("kind", list(AUTH))
def test_each_auth_type_sends_its_header_and_only_that(api, kind):
    auth, demanded = AUTH[kind]
    api.auth = demanded
    with requests.Session() as session:
        session.auth = requests.auth.HTTPBasicAuth("svc", SECRET)  # what HttpHook sets when the connection has a login
        pages = fetch(api, "/v2/items", HttpOptions(auth=auth, page_size=100), login="svc", session=session)
    assert ids(pages) == ALL_IDS
    for entry in api.log:
        sent = {k: v for k, v in entry["headers"].items() if k.lower() in ("authorization", "x-desk-key")}
        assert sent == ({demanded[0]: demanded[1]} if demanded else {})


@pytest.mark.parametrize("kind", ["bearer", "api_key", "basic"])
def test_wrong_credentials_are_rejected_at_once_without_the_secret(api, kind, caplog):
    auth, demanded = AUTH[kind]
    api.auth = (demanded[0], "the-right-one")
    wrong = "wrong-" + secrets.token_urlsafe(12)
    stats = CallStats()
    with caplog.at_level(logging.DEBUG), pytest.raises(SourceRejected) as failure:
        fetch(api, "/v2/items", HttpOptions(auth=auth), login="svc", password=wrong, stats=stats)
    message = str(failure.value)
    assert "source 'desk' stream 'items': GET /v2/items page 1 was refused: HTTP 401" in message
    assert "Airflow connection" in message and "***" in message  # the API echoed the secret; it was redacted
    encoded = base64.b64encode(f"svc:{wrong}".encode()).decode()
    assert wrong not in message and encoded not in message
    assert not any(wrong in r.getMessage() or encoded in r.getMessage() for r in caplog.records)
    assert stats.calls == len(api.log) == 1 and stats.by_status == {"401": 1}


def test_a_missing_password_sends_no_credentials_and_says_so(api):
    api.auth = ("Authorization", f"Bearer {SECRET}")
    with pytest.raises(SourceRejected, match="has no password"):
        fetch(api, "/v2/items", HttpOptions(), password=None)
    assert "Authorization" not in api.log[0]["headers"]


# --- never page forever ---------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint, options, repeated", [
    ("/loop/cursor", HttpOptions(), "repeated cursor 'again'"),
    ("/loop/link", HttpOptions(records_path="", paginator={"type": "link_header"}), "repeated next link"),
    ("/loop/pages", HttpOptions(page_size=10, records_path="result.items", params={"page_size": "per_page"},
                                paginator={"type": "page_number"}), "repeated the same 10 records"),
])
def test_a_paginator_that_repeats_itself_fails_after_one_repeat(api, endpoint, options, repeated):
    stats = CallStats()
    with pytest.raises(SourceRejected) as failure:
        fetch(api, endpoint, options, stats=stats)
    message = str(failure.value)
    assert repeated in message and "paging would never end; 2 calls made" in message
    assert f"GET {endpoint} page 2" in message
    assert stats.calls == len(api.log) == 2


def test_a_next_link_to_another_origin_is_not_followed(api):
    with pytest.raises(SourceRejected, match="another origin.*collector.example"):
        fetch(api, "/elsewhere", HttpOptions(records_path="", paginator={"type": "link_header"}))
    assert len(api.log) == 1


# --- the body -------------------------------------------------------------------------------------

def test_records_path_that_selects_no_list_is_retried_then_names_what_it_found(api):
    with pytest.raises(SourceUnavailable) as failure:
        fetch(api, "/v2/items", HttpOptions(records_path="result.items"))
    message = str(failure.value)
    assert "source 'desk' stream 'items': GET /v2/items page 1" in message
    assert "records_path 'result.items' selects nothing" in message
    assert "['data', 'next_cursor']" in message

    with pytest.raises(SourceUnavailable, match=r"records_path '' \(the body itself\) selects an object with keys "
                                             r"\['data', 'next_cursor'\]"):
        fetch(api, "/v2/items", HttpOptions(records_path=""))
    with pytest.raises(SourceUnavailable, match=r"records_path 'result' selects an object with keys \['items', "
                                             r"'total_pages'\]"):
        fetch(api, "/pages", HttpOptions(records_path="result", paginator={"type": "page_number"}))


def test_a_body_that_is_not_json_is_retried_like_a_5xx(api):
    api.faults = {2: "html", 3: "json_cut", 4: "body_cut"}
    stats, waits = CallStats(), []
    pages = fetch(api, "/v2/items", HttpOptions(page_size=100), stats=stats, sleep=waits.append)
    assert ids(pages) == ALL_IDS
    assert stats.by_status == {"200": 5, "ChunkedEncodingError": 1} and len(waits) == 3


def test_a_body_that_stays_html_makes_the_source_unavailable(api):
    api.faults = {n: "html" for n in range(2, 10)}
    stats, waits = CallStats(), []
    with pytest.raises(SourceUnavailable) as failure:
        fetch(api, "/v2/items", HttpOptions(page_size=100, max_attempts=3), stats=stats, sleep=waits.append)
    message = str(failure.value)
    assert message.startswith("source 'desk' stream 'items': GET /v2/items page 2 failed after 3 attempts")
    assert "not JSON (text/html" in message and "502 Bad Gateway" in message
    assert "Nothing was loaded" in message and SECRET not in message
    assert stats.calls == 4 and stats.by_status == {"200": 4} and len(waits) == 2


# --- the extractor --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def desk():
    from crm_sync.simulators.people import generate_people
    from crm_sync.simulators.ticketing import TicketingServer, TicketingStore

    token = secrets.token_urlsafe(16)
    store = TicketingStore.generate(generate_people(120, 5), seed=5, now=BASE)
    with TicketingServer(store, token) as server:
        server.token = token
        yield server


def test_http_extractor_reads_the_desk_through_the_airflow_connection(desk, monkeypatch):
    from crm_sync.config import load_source
    from crm_sync.sources.base import REGISTRY
    from crm_sync.sources.http_source import HttpExtractor
    from crm_sync.watermark import Window

    assert REGISTRY["http"] is HttpExtractor
    cfg = load_source("ticketing")
    assert cfg.http.auth.type == "bearer" and cfg.http.paginator.type == "cursor"  # the defaults
    url = urlsplit(desk.base_url)
    monkeypatch.setenv(f"AIRFLOW_CONN_{cfg.conn_id.upper()}", json.dumps(
        {"conn_type": "http", "host": url.hostname, "port": url.port, "password": desk.token}))

    desk.reset()
    extractor = HttpExtractor.open(cfg, cfg.stream("users"))
    try:
        assert desk.token not in repr(extractor)
        got = [r["id"] for page in extractor.records(Window(since=None, until=BASE)) for r in page]
    finally:
        extractor.close()
    assert sorted(got) == sorted(u["id"] for u in desk.store.users) and len(got) == len(set(got))
    assert extractor.calls == desk.stats()["calls"] == math.ceil(len(got) / cfg.http.page_size)
    assert extractor.by_status == desk.stats()["by_endpoint"]["/api/v2/users"] and extractor.rejects == []

    desk.reset()
    desk.set_faults(outage=True)
    extractor = HttpExtractor.open(cfg, cfg.stream("tickets"))
    extractor.sleep = lambda s: None
    try:
        with pytest.raises(SourceUnavailable, match="stream 'tickets': GET /api/v2/tickets page 1 failed after 5"):
            list(extractor.records(Window(since=None, until=BASE)))
    finally:
        extractor.close()
        desk.reset()
    assert extractor.calls == cfg.http.max_attempts == 5 and extractor.by_status == {"503": 5}


def test_http_extractor_sends_the_stream_params_and_quarantines_non_objects(api):
    from crm_sync.config import load_source
    from crm_sync.sources.http_source import HttpExtractor
    from crm_sync.watermark import Window

    cfg = load_source("ticketing")
    stream = cfg.stream("users").model_copy(update={"endpoint": "/mixed", "params": {"status": "closed"}})
    extractor = HttpExtractor(cfg, stream, requests.Session(), api.base_url, None, SECRET)
    try:
        pages = list(extractor.records(Window(since=None, until=FAR)))
    finally:
        extractor.close()
    assert ids(pages) == ["r-000", "r-001"]
    assert api.queries() == [{"status": "closed", "updated_before": FAR.isoformat(), "limit": "100"}]
    assert [(r.stage, r.reason) for r in extractor.rejects] == [
        ("extract", "page 1 item 1 is a JSON int, not a JSON object"),
        ("extract", "page 1 item 2 is a JSON str, not a JSON object"),
    ]
    assert extractor.calls == 1 and extractor.by_status == {"200": 1}
