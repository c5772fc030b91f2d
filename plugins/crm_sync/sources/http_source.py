"""Paged, rate-limit-aware, resumable reads from an HTTP API whose dialect is declared in the source YAML.

The `http:` section of a source YAML (`HttpOptions`) says how the API is spoken, the way dlt's
`rest_api` does: `auth` (bearer, api_key header, HTTP Basic, none), `params` (the names of the
window and page-size query parameters), `records_path` (where the record list sits in the body),
`paginator` (cursor, page_number, offset, link_header) and `total_path` (where the first page says
how many records the window holds). A new API needs YAML, not code.

Guarantees of `fetch_pages`:
- One request per page; every call is counted in `stats` by status, even when reading fails.
- 429 waits as `Retry-After` says, in either RFC 9110 form (delta-seconds, or an HTTP date: a date
  in the past means at once), capped by `max_retry_after_seconds`; 5xx, timeouts, dropped
  connections and a 200 whose body is not the declared JSON shape (not JSON at all: an HTML error
  page, a truncated or cut body; or JSON where `records_path` selects no list, e.g. a list where an
  object is expected, where a total or total-pages path selects no count, or where the next cursor
  is an object or a list) are retried with exponential backoff and jitter; when `max_attempts` run
  out, `SourceUnavailable` names the source, stream, endpoint, page and what was wrong (never a raw
  JSON or transport exception). Nothing has been loaded at that point.
- Any other 4xx fails at once with `SourceRejected` (retrying a bad token only costs money); so
  does a paginator that asks for a cursor, page or next link it already asked for, or that serves
  the same records as the page before although it moved on: the stream fails after one repeat and
  paging never runs forever. A next link to another origin is never followed.
- Credentials are sent only as the declared auth says (the session's own auth, e.g. the Basic
  auth `HttpHook` sets from the connection's login, is overridden), only to the origin of the
  base URL, and never appear in a log line, an error message or a checkpoint.
- With default options the requests are exactly the desk's contract: `Authorization: Bearer`,
  `updated_before`, `limit`, `updated_since` (when there is a lower bound) and `cursor`.

`HttpExtractor` is the `http` kind of the extractor registry: it opens the Airflow HTTP
connection, feeds each stream's fixed `params` into every first request, and mirrors the call
counts into `calls` / `by_status`. It is resumable: `checkpoint()` after a page is the next
request (cursor, page number, offset or next link) with the page count, and `resume(state)`
continues there without asking for a committed page again. With `max_calls_per_run` it stops
after the last complete page once the run's calls reach the budget (429/5xx retries included; an
earlier attempt of the run counts with the calls its last checkpoint recorded), without an error:
`partial` is set and the checkpoint resumes there in the next run, which gets a budget of its own.
With `total_path` the first page's count is `source_total` (a resumed attempt keeps it; the run
after a partial one expects what the count left unread, since it receives only that).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from base64 import b64encode
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import urljoin, urlsplit

from crm_sync.config import ConfigError, HttpOptions
from crm_sync.sources.base import Extractor, register

if TYPE_CHECKING:
    from crm_sync.config import SourceConfig, StreamConfig
    from crm_sync.watermark import Window

log = logging.getLogger(__name__)

_MISSING = object()


class SourceUnavailable(RuntimeError):
    """The source could not be read after every retry; nothing was loaded."""


class SourceRejected(RuntimeError):
    """The source refused the request or answered something unusable: retrying would not help."""


@dataclass
class CallStats:
    calls: int = 0
    by_status: dict[str, int] = field(default_factory=dict)

    def record(self, status: str) -> None:
        self.calls += 1
        self.by_status[status] = self.by_status.get(status, 0) + 1


def _retry_after(value: str | None, default: float, now: datetime | None = None) -> float:
    """Seconds to wait as a `Retry-After` header says: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if value is None or not value.strip():
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return default
    if when.tzinfo is None:  # "-0000": a UTC date of unknown origin
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def _select(body: Any, path: str) -> Any:
    """The value at a dotted path of a JSON body ("" = the body itself), or `_MISSING`."""
    value = body
    for part in path.split(".") if path else ():
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "nothing"
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)[:10]}"
    if isinstance(value, list):
        return f"a JSON list of {len(value)} items"
    if value is None:
        return "null"
    return f"a JSON {type(value).__name__}"


def _fingerprint(records: list) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class _Request:
    url: str
    params: dict[str, Any] | None

    def key(self) -> str:
        """The URL exactly as it is sent: two requests with one key ask for the same page."""
        from requests.models import PreparedRequest

        prepared = PreparedRequest()
        prepared.prepare_url(self.url, self.params)
        return prepared.url


class _BadBody(Exception):
    """A 200 whose body is not the declared JSON shape: retried like a 5xx."""


class _BudgetSpent(Exception):
    """The run's call budget is spent before the page could be read."""

    def __init__(self, last_error: str | None) -> None:
        super().__init__(last_error or "call budget spent")
        self.last_error = last_error


@dataclass(frozen=True)
class _Page:
    records: list
    next: _Request | None
    asked: str            # the request's key
    answered: str         # the URL that answered (redirects followed)
    total: int | None     # the window's record count, when `total_path` is read from this page


@dataclass(frozen=True)
class _Auth:
    apply: Callable  # a requests auth callable: it replaces whatever auth the session carries
    secrets: tuple[str, ...]
    hint: str


def _no_auth(request):
    return request


def _auth(options: HttpOptions, login: str | None, password: str | None) -> _Auth:
    kind = options.auth.type
    if kind == "basic" and (login or password):
        # some APIs take the key as the Basic login with an empty password: then the login is the secret
        token = b64encode(f"{login or ''}:{password or ''}".encode()).decode()
        header, value = "Authorization", f"Basic {token}"
        secrets = tuple(s for s in (password or login, token) if s)
        hint = " — check the login and password of the Airflow connection"
    elif kind == "none" or not password:
        hint = "" if kind == "none" else " — the Airflow connection has no password (the API secret)"
        return _Auth(_no_auth, (), hint)
    elif kind == "api_key":
        header, value = options.auth.header, password
        secrets, hint = (password,), f" — check the API key (password) of the Airflow connection, sent as {header}"
    else:
        header, value = "Authorization", f"Bearer {password}"
        secrets, hint = (password,), " — check the API token (password) of the Airflow connection"

    def apply(request):
        request.headers[header] = value
        return request

    return _Auth(apply, secrets, hint)


class _Pager:
    """One stream's paging through one window: requests, retries, body shape, next page, repeats, budget.

    `next_request` is the request of the page to read next (None: paging is over), `page` the pages
    read so far; with `fingerprint` and `last` they are the state a later attempt resumes from.
    """

    def __init__(self, session, url: str, params: dict[str, Any], *, options: HttpOptions, auth: _Auth,
                 source: str, stream: str, endpoint: str, stats: CallStats, sleep: Callable[[float], None]):
        self.session = session
        self.options = options
        self.paginator = options.paginator
        self.auth = auth
        self.source, self.stream, self.endpoint = source, stream, endpoint
        self.stats = stats
        self.sleep = sleep
        self.rng = random.Random()
        self.origin = urlsplit(url)[:2]
        self.calls_before = stats.calls
        self.page_size_sent = options.params.page_size is not None
        self.next_request: _Request | None = _Request(url, params)
        self.page = 0
        self.fingerprint: str | None = None   # of the last page's records
        self.last: str | None = None          # key of the request that read the last page
        self.seen: set[str] = set()           # keys of every request asked (and URL answered) while paging
        self.total: int | None = None         # `total_path` of the first page
        self.budget: int | None = options.max_calls_per_run
        self.budget_used_before = 0           # calls of this run made by earlier attempts
        self.partial = False                  # stopped because the budget was spent
        self.budget_stopped: str | None = None  # the error of the page that was failing when it was

    # --- checkpoint ----------------------------------------------------------------------------

    def state(self) -> dict:
        """Where paging stands after the last page read: JSON, free of credentials."""
        nxt = self.next_request
        return {"version": 1, "endpoint": self.endpoint, "paginator": self.paginator.type,
                "next": None if nxt is None else {"url": nxt.url, "params": nxt.params},
                "pages": self.page, "last": self.last, "fingerprint": self.fingerprint}

    def restore(self, state: dict) -> bool:
        """Continue from `state()`; False (and nothing changed) when it does not fit this stream."""
        nxt = state.get("next")
        misfit = None
        if state.get("version") != 1:
            misfit = f"checkpoint version {state.get('version')!r}"
        elif state.get("endpoint") != self.endpoint or state.get("paginator") != self.paginator.type:
            misfit = (f"the checkpoint is for GET {state.get('endpoint')} paged by {state.get('paginator')}, "
                      f"the YAML now says GET {self.endpoint} paged by {self.paginator.type}")
        elif nxt is not None and urlsplit(nxt["url"])[:2] != self.origin:
            misfit = f"the checkpoint's next request goes to {urlsplit(nxt['url']).netloc}, not {self.origin[1]}"
        if misfit:
            log.warning("source '%s' stream '%s': cannot resume paging (%s); reading the window from its first "
                        "page", self.source, self.stream, misfit)
            return False
        self.next_request = None if nxt is None else _Request(nxt["url"], nxt["params"])
        self.page = int(state.get("pages") or 0)
        self.fingerprint = state.get("fingerprint")
        self.last = state.get("last")
        if self.last:
            self.seen.add(self.last)
        return True

    # --- messages ------------------------------------------------------------------------------

    def what(self, page: int) -> str:
        return f"source '{self.source}' stream '{self.stream}': GET {self.endpoint} page {page}"

    def redact(self, text: str) -> str:
        for secret in self.auth.secrets:
            text = text.replace(secret, "***")
        return text

    def calls(self) -> int:
        return self.stats.calls - self.calls_before

    def rejected(self, page: int, problem: str) -> SourceRejected:
        return SourceRejected(self.redact(f"{self.what(page)}: {problem}"))

    def endless(self, page: int, repeated: str) -> SourceRejected:
        return self.rejected(page, f"the API repeated {repeated}: paging would never end; {self.calls()} calls made")

    # --- one page, with retries ----------------------------------------------------------------

    def spent(self) -> bool:
        return self.budget is not None and self.budget_used_before + self.calls() >= self.budget

    def get(self, request: _Request, page: int) -> _Page:
        """The page read and understood, or SourceUnavailable / SourceRejected / _BudgetSpent."""
        import requests

        options = self.options
        what = self.what(page)
        attempt = 0
        if self.spent():
            raise _BudgetSpent(None)
        while True:
            attempt += 1
            try:
                response = self.session.get(request.url, params=request.params, auth=self.auth.apply,
                                            headers={"Accept": "application/json"}, timeout=options.timeout_seconds)
            except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as exc:
                self.stats.record(type(exc).__name__)
                last = f"{_transport_problem(exc, options.timeout_seconds)} ({type(exc).__name__}: {exc})"
            else:
                self.stats.record(str(response.status_code))
                if response.status_code == 200:
                    try:
                        return self.understand(request, response, page)
                    except _BadBody as exc:
                        last = f"HTTP 200 but {exc}"
                else:
                    last = f"HTTP {response.status_code} {response.reason}: {response.text[:200]}"
                    if response.status_code == 429:
                        wait = min(_retry_after(response.headers.get("Retry-After"), options.backoff_seconds),
                                   options.max_retry_after_seconds)
                        if attempt < options.max_attempts and not self.spent():
                            log.warning("%s rate limited (429); waiting %.1fs as Retry-After says", what, wait)
                            self.sleep(wait)
                            continue
                    elif 400 <= response.status_code < 500:
                        hint = self.auth.hint if response.status_code in (401, 403) else ""
                        raise SourceRejected(self.redact(f"{what} was refused: {last}{hint}"))
            last = self.redact(last)
            if attempt >= options.max_attempts:
                raise SourceUnavailable(
                    f"{what} failed after {attempt} attempts; last error: {last}. "
                    "Nothing was loaded and the watermark did not move; Airflow retries the task while tries remain."
                )
            if self.spent():
                raise _BudgetSpent(last)
            wait = options.backoff_seconds * (2 ** (attempt - 1)) * (0.5 + self.rng.random() / 2)
            log.warning("%s attempt %d failed (%s); retrying in %.1fs", what, attempt, last, wait)
            self.sleep(wait)

    def understand(self, request: _Request, response, page: int) -> _Page:
        """The records, the next request and the total of a 200; _BadBody when the body is not the declared shape."""
        try:
            body = response.json()
        except ValueError:
            kind = response.headers.get("Content-Type", "no content type")
            raise _BadBody(f"the body is not JSON ({kind}, {len(response.content)} bytes): "
                           f"{response.text[:200]!r}") from None
        records = self.records(body)
        total = None
        if page == 1 and self.options.total_path is not None:
            total = self.count(body, self.options.total_path, "total_path")
        return _Page(records, self.next(request, response, body, records, page), request.key(), response.url, total)

    def records(self, body: Any) -> list:
        path = self.options.records_path
        records = _select(body, path)
        if not isinstance(records, list):
            where = f"records_path '{path}'" if path else "records_path '' (the body itself)"
            raise _BadBody(f"{where} selects {_describe(records)}, not a list of records; "
                           f"the body is {_describe(body)}")
        return records

    # --- the next page -------------------------------------------------------------------------

    def count(self, body: Any, path: str, option: str = "paginator path") -> int:
        value = _select(body, path)
        try:
            if isinstance(value, bool):
                raise TypeError
            return int(value)
        except (TypeError, ValueError):
            raise _BadBody(f"{option} '{path}' selects {_describe(value)}, not a count; "
                           f"the body is {_describe(body)}") from None

    def short(self, records: list) -> bool:
        # Only when we asked for a page size: a server choosing its own may serve fewer per page.
        return self.page_size_sent and len(records) < self.options.page_size

    def next(self, request: _Request, response, body: Any, records: list, page: int) -> _Request | None:
        p = self.paginator
        if p.type == "cursor":
            cursor = _select(body, p.next_cursor_path)
            if not cursor or cursor is _MISSING:
                if cursor is _MISSING and records and not self.short(records):
                    log.warning("%s: the body has no '%s'; taking this page as the last one",
                                self.what(page), p.next_cursor_path)
                return None
            if isinstance(cursor, (dict, list)):
                raise _BadBody(f"next_cursor_path '{p.next_cursor_path}' selects {_describe(cursor)}, not a cursor")
            return _Request(request.url, {**request.params, p.cursor_param: cursor})
        if p.type == "page_number":
            number = request.params[p.page_param]
            if not records or self.short(records):
                return None
            if p.total_pages_path is not None and number - p.start + 1 >= self.count(body, p.total_pages_path):
                return None
            return _Request(request.url, {**request.params, p.page_param: number + 1})
        if p.type == "offset":
            offset = request.params[p.offset_param] + len(records)
            if not records or self.short(records):
                return None
            if p.total_path is not None:
                total = self.count(body, p.total_path)
            else:
                try:
                    total = int(response.headers["X-Total-Count"])
                except (KeyError, ValueError):
                    total = None
            if total is not None and offset >= total:
                return None
            return _Request(request.url, {**request.params, p.offset_param: offset})
        # link_header
        link = response.links.get("next", {}).get("url")
        if not link:
            return None
        url = urljoin(response.url, link)
        if urlsplit(url)[:2] != self.origin:
            raise self.rejected(page, f"the next link leads to another origin ({urlsplit(url).netloc}); "
                                      f"credentials are only sent to {self.origin[1]}")
        return _Request(url, None)

    def repeated(self, got: _Page, fingerprint: str) -> str | None:
        """What the API repeats, if the page it just served would make paging go round in circles."""
        p, nxt = self.paginator, got.next
        if nxt is None:
            return None
        if nxt.key() in self.seen or nxt.key() in (got.asked, got.answered):
            if p.type == "cursor":
                return f"cursor {str(nxt.params[p.cursor_param])[:80]!r}"
            if p.type == "link_header":
                return f"next link {nxt.url[:200]!r}"
            param = p.page_param if p.type == "page_number" else p.offset_param
            return f"'{param}' {nxt.params[param]!r}"
        if got.records and fingerprint == self.fingerprint:
            moved = {"cursor": "the cursor", "link_header": "the next link", "page_number": f"'{p.page_param}'",
                     "offset": f"'{p.offset_param}'"}[p.type]
            return f"the same {len(got.records)} records although {moved} moved on"
        return None

    def pages(self) -> Iterator[list]:
        while self.next_request is not None:
            page = self.page + 1
            try:
                got = self.get(self.next_request, page)
            except _BudgetSpent as spent:
                self.partial, self.budget_stopped = True, spent.last_error
                log.info("%s: the call budget of %d calls per run is spent; paging stops here and resumes "
                         "next run", self.what(page), self.budget)
                return
            fingerprint = _fingerprint(got.records)
            repeat = self.repeated(got, fingerprint)
            if repeat is not None:
                raise self.endless(page, repeat)
            self.seen.update((got.asked, got.answered))
            self.page, self.last, self.next_request, self.fingerprint = page, got.asked, got.next, fingerprint
            if got.total is not None:
                self.total = got.total
            yield got.records


def _transport_problem(exc: Exception, timeout: float) -> str:
    import requests

    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the connection was cut inside the body (a truncated response)"
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return "the body could not be decoded"
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout:g}s"
    return "the connection failed or dropped"


def _open_pager(session, base_url: str, endpoint: str, *, options: HttpOptions, login: str | None,
                password: str | None, source: str, stream: str, since: datetime | None, until: datetime,
                extra_params: dict | None, stats: CallStats, sleep: Callable[[float], None]) -> _Pager:
    url = base_url.rstrip("/") + "/" + endpoint.lstrip("/")
    params = _first_params(options, source=source, stream=stream, since=since, until=until,
                           extra_params=extra_params)
    return _Pager(session, url, params, options=options, auth=_auth(options, login, password), source=source,
                  stream=stream, endpoint=endpoint, stats=stats, sleep=sleep)


def _first_params(options: HttpOptions, *, source: str, stream: str, since: datetime | None, until: datetime,
                  extra_params: dict | None) -> dict[str, Any]:
    names, p = options.params, options.paginator
    params: dict[str, Any] = {}
    if names.until:
        params[names.until] = until.isoformat()
    if names.page_size:
        params[names.page_size] = options.page_size
    if names.since and since is not None:
        params[names.since] = since.isoformat()
    if p.type == "page_number":
        params[p.page_param] = p.start
    elif p.type == "offset":
        params[p.offset_param] = 0
    paging = {"cursor": p.cursor_param, "page_number": p.page_param, "offset": p.offset_param}.get(p.type)
    ours = {n for n in (names.since, names.until, names.page_size, paging) if n}
    clash = sorted(ours & set(extra_params or {}))
    if clash:
        raise ConfigError(f"include/sources/{source}.yaml: stream '{stream}': field 'params': {clash} are "
                          "already sent by http.params / http.paginator; remove them from the stream's params")
    return {**(extra_params or {}), **params}


def fetch_pages(
    session,
    base_url: str,
    endpoint: str,
    *,
    options: HttpOptions,
    login: str | None,
    password: str | None,
    source: str,
    stream: str,
    since: datetime | None,
    until: datetime,
    extra_params: dict | None = None,
    stats: CallStats,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[list[dict]]:
    """Yield each page's records for `since <= cursor < until`, paging as `options` declares.

    `extra_params` (the stream's fixed query parameters) go with the first request; the paginator
    carries them on (a link_header next URL already has them).
    """
    return _open_pager(session, base_url, endpoint, options=options, login=login, password=password,
                       source=source, stream=stream, since=since, until=until, extra_params=extra_params,
                       stats=stats, sleep=sleep).pages()


@register
class HttpExtractor(Extractor):
    """Reads one stream of an `http` source through the Airflow HTTP connection `cfg.conn_id`
    (host/port = base URL, login/password = the credentials `http.auth` sends)."""

    kind = "http"
    resumable = True

    def __init__(self, cfg: "SourceConfig", stream: "StreamConfig", session, base_url: str,
                 login: str | None, password: str | None) -> None:
        super().__init__(cfg, stream)
        self.session = session
        self.base_url = base_url
        self._login = login
        self._password = password
        self.stats = CallStats()
        self.sleep: Callable[[float], None] = time.sleep
        self._resume_state: dict | None = None
        self._pager: _Pager | None = None
        self._received = 0        # records (objects or not) this run has read, over its attempts
        self._calls_before = 0    # calls this run made in earlier attempts: they count against the budget

    def __repr__(self) -> str:
        return f"HttpExtractor({self.cfg.source}.{self.stream.name} @ {self.base_url})"

    @classmethod
    def open(cls, cfg: "SourceConfig", stream: "StreamConfig") -> "HttpExtractor":
        from airflow.providers.http.hooks.http import HttpHook

        hook = HttpHook(method="GET", http_conn_id=cfg.conn_id)
        session = hook.get_conn()
        connection = hook.get_connection(cfg.conn_id)
        return cls(cfg, stream, session, hook.base_url, connection.login, connection.password)

    def checkpoint(self) -> dict | None:
        """The next request, page count, total and this run's calls and records after the last page yielded."""
        if self._pager is None:
            return self._resume_state
        return {**self._pager.state(), "total": self.source_total, "received": self._received,
                "calls": self._calls_before + self.calls, "partial": self.partial}

    def resume(self, state: dict) -> None:
        """Before `records()`: continue from a `checkpoint()` (another attempt of the run, or the run
        after a budget-limited one: that one starts a fresh budget and expects what the total left)."""
        self._resume_state = dict(state) if state else None

    def records(self, window: "Window") -> Iterator[list[dict]]:
        from crm_sync.quarantine import Reject

        pager = _open_pager(self.session, self.base_url, self.stream.endpoint, options=self.cfg.http,
                            login=self._login, password=self._password, source=self.cfg.source,
                            stream=self.stream.name, since=window.since, until=window.until,
                            extra_params=self.stream.params, stats=self.stats, sleep=self.sleep)
        state = self._resume_state
        if state is not None and pager.restore(state):
            total, received = state.get("total"), int(state.get("received") or 0)
            if state.get("partial"):  # a new run: its own budget, and what the window's count left unread
                self.source_total = None if total is None else max(0, int(total) - received)
            else:                     # another attempt of the same run
                self.source_total = total
                self._received, self._calls_before = received, int(state.get("calls") or 0)
        pager.budget_used_before = self._calls_before
        self._pager = pager
        try:
            for page in pager.pages():
                self._count()
                if pager.total is not None and pager.page == 1:
                    self.source_total = pager.total
                self._received += len(page)
                records = []
                for index, item in enumerate(page):
                    if isinstance(item, dict):
                        records.append(item)
                    else:
                        self.rejects.append(Reject(self.stream.name, None, "extract", None,
                                                   f"page {pager.page} item {index} is {_describe(item)}, "
                                                   "not a JSON object", {"value": item}))
                yield records
            self.partial = pager.partial
        finally:
            self._count()

    @property
    def notices(self) -> list[str]:
        pager = self._pager
        if pager is None or not pager.partial or pager.budget_stopped is None:
            return []
        return [f"{pager.what(pager.page + 1)}: the call budget ran out while this page was failing "
                f"(last error: {pager.budget_stopped}); the next run asks for it again."]

    def _count(self) -> None:
        self.calls = self.stats.calls
        self.by_status = dict(self.stats.by_status)

    def close(self) -> None:
        self.session.close()
