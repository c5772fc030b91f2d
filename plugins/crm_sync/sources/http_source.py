"""Paged, rate-limit-aware reads from an HTTP API whose dialect is declared in the source YAML.

The `http:` section of a source YAML (`HttpOptions`) says how the API is spoken, the way dlt's
`rest_api` does: `auth` (bearer, api_key header, HTTP Basic, none), `params` (the names of the
window and page-size query parameters), `records_path` (where the record list sits in the body)
and `paginator` (cursor, page_number, offset, link_header). A new API needs YAML, not code.

Guarantees of `fetch_pages`:
- One request per page; every call is counted in `stats` by status, even when reading fails.
- 429 waits as `Retry-After` says (capped by `max_retry_after_seconds`); 5xx, timeouts, dropped
  connections and a 200 whose body is not JSON (an HTML error page, a truncated body) are
  retried with exponential backoff and jitter; when `max_attempts` run out, `SourceUnavailable`
  names the source, stream, endpoint, page and last error. Nothing has been loaded at that point.
- Any other 4xx fails at once with `SourceRejected` (retrying a bad token only costs money); so
  does a body whose `records_path` does not select a list (the message names the path and what
  was there instead) and a paginator that asks for the same cursor or next link twice in a row:
  paging never runs forever.
- Credentials are sent only as the declared auth says (the session's own auth, e.g. the Basic
  auth `HttpHook` sets from the connection's login, is overridden), only to the origin of the
  base URL, and never appear in a log line or an error message.
- With default options the requests are exactly the desk's contract: `Authorization: Bearer`,
  `updated_before`, `limit`, `updated_since` (when there is a lower bound) and `cursor`.

`HttpExtractor` is the `http` kind of the extractor registry: it opens the Airflow HTTP
connection, feeds each stream's fixed `params` into every first request, and mirrors the call
counts into `calls` / `by_status`.
"""
from __future__ import annotations

import logging
import random
import time
from base64 import b64encode
from dataclasses import dataclass, field
from datetime import datetime
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


def _retry_after(value: str | None, default: float) -> float:
    try:
        return max(0.0, float(value)) if value is not None else default
    except ValueError:
        return default


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
    if value is None:
        return "null"
    return f"a JSON {type(value).__name__}"


@dataclass(frozen=True)
class _Request:
    url: str
    params: dict[str, Any] | None


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
    """One stream's paging through one window: requests, retries, record selection, next page."""

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
        self.first = _Request(url, params)
        self.origin = urlsplit(url)[:2]
        self.calls_before = stats.calls
        self.page_size_sent = options.params.page_size is not None
        self.previous_records: list | None = None

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

    def get(self, request: _Request, page: int):
        """The response and its JSON body, or SourceUnavailable / SourceRejected."""
        import requests

        options = self.options
        what = self.what(page)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.session.get(request.url, params=request.params, auth=self.auth.apply,
                                            headers={"Accept": "application/json"}, timeout=options.timeout_seconds)
            except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                # ChunkedEncodingError: the connection dropped inside the body (a truncated response)
                self.stats.record(type(exc).__name__)
                last = f"{type(exc).__name__}: {exc}"
            else:
                self.stats.record(str(response.status_code))
                if response.status_code == 200:
                    try:
                        return response, response.json()
                    except ValueError:
                        kind = response.headers.get("Content-Type", "no content type")
                        last = f"HTTP 200 but the body is not JSON ({kind}, {len(response.content)} bytes): " \
                               f"{response.text[:200]!r}"
                else:
                    last = f"HTTP {response.status_code} {response.reason}: {response.text[:200]}"
                    if response.status_code == 429:
                        wait = min(_retry_after(response.headers.get("Retry-After"), options.backoff_seconds),
                                   options.max_retry_after_seconds)
                        if attempt < options.max_attempts:
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
                    "Nothing was loaded and the watermark did not move; the task will retry."
                )
            wait = options.backoff_seconds * (2 ** (attempt - 1)) * (0.5 + self.rng.random() / 2)
            log.warning("%s attempt %d failed (%s); retrying in %.1fs", what, attempt, last, wait)
            self.sleep(wait)

    def records(self, body: Any, page: int) -> list:
        path = self.options.records_path
        records = _select(body, path)
        if not isinstance(records, list):
            where = f"records_path '{path}'" if path else "records_path '' (the body itself)"
            raise self.rejected(page, f"{where} selects {_describe(records)}, not a list of records; "
                                      f"the body is {_describe(body)}")
        return records

    # --- the next page -------------------------------------------------------------------------

    def total(self, body: Any, path: str, page: int) -> int:
        value = _select(body, path)
        try:
            if isinstance(value, bool):
                raise TypeError
            return int(value)
        except (TypeError, ValueError):
            raise self.rejected(page, f"paginator path '{path}' selects {_describe(value)}, not a count; "
                                      f"the body is {_describe(body)}") from None

    def short(self, records: list) -> bool:
        # Only when we asked for a page size: a server choosing its own may serve fewer per page.
        return self.page_size_sent and len(records) < self.options.page_size

    def same_as_before(self, records: list, page: int, param: str) -> None:
        if records == self.previous_records:
            raise self.endless(page, f"the same {len(records)} records although '{param}' moved on")
        self.previous_records = records

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
                raise self.rejected(page, f"next_cursor_path '{p.next_cursor_path}' selects {_describe(cursor)}, "
                                          "not a cursor")
            if cursor == request.params.get(p.cursor_param):
                raise self.endless(page, f"cursor {str(cursor)[:80]!r}")
            return _Request(request.url, {**request.params, p.cursor_param: cursor})
        if p.type == "page_number":
            number = request.params[p.page_param]
            if not records or self.short(records):
                return None
            if p.total_pages_path is not None and number - p.start + 1 >= self.total(body, p.total_pages_path, page):
                return None
            self.same_as_before(records, page, p.page_param)
            return _Request(request.url, {**request.params, p.page_param: number + 1})
        if p.type == "offset":
            offset = request.params[p.offset_param] + len(records)
            if not records or self.short(records):
                return None
            if p.total_path is not None:
                total = self.total(body, p.total_path, page)
            else:
                try:
                    total = int(response.headers["X-Total-Count"])
                except (KeyError, ValueError):
                    total = None
            if total is not None and offset >= total:
                return None
            self.same_as_before(records, page, p.offset_param)
            return _Request(request.url, {**request.params, p.offset_param: offset})
        # link_header
        link = response.links.get("next", {}).get("url")
        if not link:
            return None
        url = urljoin(response.url, link)
        if url == response.url or (request.params is None and url == request.url):
            raise self.endless(page, f"next link {url[:200]!r}")
        if urlsplit(url)[:2] != self.origin:
            raise self.rejected(page, f"the next link leads to another origin ({urlsplit(url).netloc}); "
                                      f"credentials are only sent to {self.origin[1]}")
        return _Request(url, None)

    def pages(self) -> Iterator[list]:
        request: _Request | None = self.first
        page = 0
        while request is not None:
            page += 1
            response, body = self.get(request, page)
            records = self.records(body, page)
            request = self.next(request, response, body, records, page)
            yield records


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
    url = base_url.rstrip("/") + "/" + endpoint.lstrip("/")
    params = _first_params(options, source=source, stream=stream, since=since, until=until,
                           extra_params=extra_params)
    pager = _Pager(session, url, params, options=options, auth=_auth(options, login, password), source=source,
                   stream=stream, endpoint=endpoint, stats=stats, sleep=sleep)
    return pager.pages()


@register
class HttpExtractor(Extractor):
    """Reads one stream of an `http` source through the Airflow HTTP connection `cfg.conn_id`
    (host/port = base URL, login/password = the credentials `http.auth` sends)."""

    kind = "http"

    def __init__(self, cfg: "SourceConfig", stream: "StreamConfig", session, base_url: str,
                 login: str | None, password: str | None) -> None:
        super().__init__(cfg, stream)
        self.session = session
        self.base_url = base_url
        self._login = login
        self._password = password
        self.stats = CallStats()
        self.sleep: Callable[[float], None] = time.sleep

    def __repr__(self) -> str:
        return f"HttpExtractor({self.cfg.source}.{self.stream.name} @ {self.base_url})"

    @classmethod
    def open(cls, cfg: "SourceConfig", stream: "StreamConfig") -> "HttpExtractor":
        from airflow.providers.http.hooks.http import HttpHook

        hook = HttpHook(method="GET", http_conn_id=cfg.conn_id)
        session = hook.get_conn()
        connection = hook.get_connection(cfg.conn_id)
        return cls(cfg, stream, session, hook.base_url, connection.login, connection.password)

    def records(self, window: "Window") -> Iterator[list[dict]]:
        from crm_sync.quarantine import Reject

        pages = fetch_pages(self.session, self.base_url, self.stream.endpoint, options=self.cfg.http,
                            login=self._login, password=self._password, source=self.cfg.source,
                            stream=self.stream.name, since=window.since, until=window.until,
                            extra_params=self.stream.params, stats=self.stats, sleep=self.sleep)
        try:
            for number, page in enumerate(pages, 1):
                self._count()
                records = []
                for index, item in enumerate(page):
                    if isinstance(item, dict):
                        records.append(item)
                    else:
                        self.rejects.append(Reject(self.stream.name, None, "extract", None,
                                                   f"page {number} item {index} is {_describe(item)}, "
                                                   "not a JSON object", {"value": item}))
                yield records
        finally:
            self._count()

    def _count(self) -> None:
        self.calls = self.stats.calls
        self.by_status = dict(self.stats.by_status)

    def close(self) -> None:
        self.session.close()
