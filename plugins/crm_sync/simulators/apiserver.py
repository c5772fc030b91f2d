"""The plumbing the loopback API simulators (ticketing, IM, call center) share; each keeps its own dialect.

Guarantees:
- `Faults` is what a simulated API does wrong; zero / False everywhere means a well-behaved API.
  `new_app(title, faults)` makes a FastAPI app (no docs endpoints) whose `app.state.faults`,
  `app.state.stats` (a `_Stats`) and `app.state.error_rng` are the live settings, counters and the
  seeded draws of `error_rate`; `set_faults(app, **changes)` validates and applies changes, and
  re-seeds the draws when `seed` changes.
- `misbehave(app, error, messages)` is called by a data endpoint once the caller is authorised: it
  counts the request (the clock of the every-Nth faults) and returns the fault's response, built by
  the simulator's own `error(status, message, headers)` from `messages` (keys: outage, rate_limited,
  flaky, internal, unavailable), or None after any hang or slow-down. In order: `outage` -> 503,
  every `rate_limit_every`th -> 429 with `Retry-After` (delta-seconds, or an HTTP date that many
  seconds ahead with `retry_after_date`), every `error_every`th -> 503, `error_rate` -> 500 or 503,
  then every `bad_body_every`th request (and every one from the `bad_body_from`th on) answers 200
  with a body of the wrong shape, whatever the dialect (`bad_body`: malformed_json, html,
  json_list, or cut: a Content-Length larger than what is sent, then the connection closes); then
  every `timeout_every`th hangs `hang_seconds` and `slow_seconds` delays all.
- Faults of a cursor dialect, which the simulator that has one honours (the ticketing desk):
  `cursor_stuck` (the next cursor is the one the request sent: it never advances),
  `cursor_replays` (a new cursor each time that serves the same page again) and `first_page_total`
  (the first page carries `total`, the window's record count, as some APIs do).
- `install_admin(app, authorised, error, unauthorised)` adds `POST /_admin/faults` (a JSON object of
  changes; 400 via `error` if it is not one or names an unknown or mistyped setting),
  `GET /_admin/stats` and `POST /_admin/stats/reset`, each answering `unauthorised()` unless
  `authorised(request)`.
- `ApiServer(app, host, port)` runs an app with uvicorn in a background thread (on a free port when
  `port` is 0) and returns from `start()` only once it answers; it is a context manager and offers
  `set_faults`, `reset` (well-behaved, zeroed counters) and `stats`.
- `run_standalone(argv, description, port, credentials, build)` is a simulator's `python -m` entry
  point: the common flags (host, port, people, seed and the rate-limit, error-rate and slow faults)
  plus its own required credentials, each defaulting to an environment variable.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any, Awaitable, Callable, Mapping, Sequence

from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, Response

__all__ = ["BAD_BODIES", "Faults", "ApiServer", "ErrorResponse", "HTTP_FAULT_MESSAGES", "free_port", "faults_from_args",
           "install_admin", "misbehave", "new_app", "run_standalone", "set_faults", "simulator_parser"]

ErrorResponse = Callable[..., JSONResponse]  # error(status, message, headers=None), in the simulator's dialect

# The fault messages of a plain REST API; a simulator with another vocabulary passes its own.
HTTP_FAULT_MESSAGES = {
    "outage": "service unavailable (outage)",
    "rate_limited": "rate limit exceeded",
    "flaky": "service unavailable (flaky)",
    "internal": "internal error",
    "unavailable": "service unavailable",
}


# What a 200 with a body of the wrong shape looks like (`Faults.bad_body`).
BAD_BODIES = frozenset({"malformed_json", "html", "json_list", "cut"})


@dataclass(frozen=True)
class Faults:
    """What a simulated API does wrong. Zero / False everywhere means a well-behaved API."""

    rate_limit_every: int = 0        # every Nth data request answers 429
    retry_after_seconds: int = 1     # the Retry-After header of those 429s
    error_rate: float = 0.0          # this fraction of data requests answers 503 or 500
    error_every: int = 0             # every Nth data request answers 503 (a deterministic flaky API)
    slow_seconds: float = 0.0        # every data request waits this long first
    timeout_every: int = 0           # every Nth data request hangs for hang_seconds
    hang_seconds: float = 30.0       # longer than any sane client timeout
    outage: bool = False             # every data request answers 503
    seed: int = 0                    # of the error_rate draws, so a failing run can be replayed
    retry_after_date: bool = False   # the 429s' Retry-After is an HTTP date retry_after_seconds ahead
    bad_body: str = "malformed_json"  # what a bad 200 body is: one of BAD_BODIES
    bad_body_every: int = 0          # every Nth data request answers 200 with a `bad_body`
    bad_body_from: int = 0           # every data request from the Nth on does (a body that stays bad)
    cursor_stuck: bool = False       # cursor dialects: the next cursor is the one sent (never advances)
    cursor_replays: bool = False     # cursor dialects: a fresh cursor that serves the same page again
    first_page_total: bool = False   # cursor dialects: the first page carries `total` (records in the window)

    def __post_init__(self) -> None:
        if self.bad_body not in BAD_BODIES:
            raise ValueError(f"fault setting bad_body must be one of {sorted(BAD_BODIES)}, got {self.bad_body!r}")

    def updated(self, **changes: Any) -> "Faults":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown fault settings {unknown}; known: {sorted(known)}")
        for name, value in changes.items():
            expected = type(getattr(self, name))
            allowed = (int, float) if expected is float else expected
            if not isinstance(value, allowed) or (expected is not bool and isinstance(value, bool)):
                raise ValueError(f"fault setting {name} must be {expected.__name__}, got {value!r}")
        return replace(self, **changes)

    def bad_body_due(self, n: int) -> bool:
        return bool((self.bad_body_every and n % self.bad_body_every == 0)
                    or (self.bad_body_from and n >= self.bad_body_from))


class _CutBody(Response):
    """A 200 that announces more body than it sends, then drops the connection (a truncated read)."""

    def __init__(self, sent: bytes, announced: int) -> None:
        super().__init__(status_code=200, media_type="application/json")
        self.sent, self.announced = sent, announced

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(self.announced).encode())]})
        await send({"type": "http.response.body", "body": self.sent, "more_body": True})
        # returning without the rest makes uvicorn close the connection mid-body (it logs that it did)


def _bad_body(kind: str) -> Response:
    if kind == "html":  # a proxy's or CDN's error page, served with 200
        return Response(b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1>"
                        b"<p>The upstream did not answer.</p></body></html>", status_code=200, media_type="text/html")
    if kind == "json_list":  # JSON, but a list where the dialect has an object
        return Response(b'[{"error": "maintenance"}]', status_code=200, media_type="application/json")
    if kind == "cut":
        return _CutBody(b'{"data": [{"id": "u-000001", "name": "', announced=4096)
    return Response(b'{"data": [{"id": "u-000001", "name": "Li', status_code=200, media_type="application/json")


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_endpoint: dict[str, dict[str, int]] = {}
        self.requests = 0  # authenticated data requests, the clock of the every-Nth faults

    def record(self, endpoint: str, status: int) -> None:
        with self.lock:
            counts = self.by_endpoint.setdefault(endpoint, {})
            counts[str(status)] = counts.get(str(status), 0) + 1

    def tick(self) -> int:
        with self.lock:
            self.requests += 1
            return self.requests

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "calls": sum(sum(c.values()) for c in self.by_endpoint.values()),
                "by_endpoint": {e: dict(c) for e, c in self.by_endpoint.items()},
            }

    def reset(self) -> None:
        with self.lock:
            self.by_endpoint.clear()
            self.requests = 0


def new_app(title: str, faults: Faults | None = None) -> FastAPI:
    """A FastAPI app without docs endpoints, with the live fault settings, counters and draws in `app.state`."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.faults = faults or Faults()
    app.state.stats = _Stats()
    app.state.error_rng = random.Random(app.state.faults.seed)
    return app


def set_faults(app: FastAPI, **changes: Any) -> Faults:
    """Apply `changes` to the app's faults (ValueError if one is unknown or mistyped); re-seed on `seed`."""
    app.state.faults = app.state.faults.updated(**changes)
    if "seed" in changes:
        app.state.error_rng = random.Random(app.state.faults.seed)
    return app.state.faults


async def misbehave(app: FastAPI, error: ErrorResponse,
                    messages: Mapping[str, str] = HTTP_FAULT_MESSAGES) -> Response | None:
    """Count an authorised data request; the fault's response if it fails, else None (after any hang or delay)."""
    f: Faults = app.state.faults
    n = app.state.stats.tick()
    if f.outage:
        return error(503, messages["outage"])
    if f.rate_limit_every and n % f.rate_limit_every == 0:
        if f.retry_after_date:
            when = datetime.now(timezone.utc) + timedelta(seconds=f.retry_after_seconds)
            retry_after = format_datetime(when, usegmt=True)
        else:
            retry_after = str(f.retry_after_seconds)
        return error(429, messages["rate_limited"], {"Retry-After": retry_after})
    if f.error_every and n % f.error_every == 0:
        return error(503, messages["flaky"])
    if f.error_rate and app.state.error_rng.random() < f.error_rate:
        status = app.state.error_rng.choice((500, 503))
        return error(status, messages["internal"] if status == 500 else messages["unavailable"])
    if f.bad_body_due(n):
        return _bad_body(f.bad_body)
    if f.timeout_every and n % f.timeout_every == 0:
        await asyncio.sleep(f.hang_seconds)
    if f.slow_seconds:
        await asyncio.sleep(f.slow_seconds)
    return None


def install_admin(app: FastAPI, authorised: Callable[[Request], bool], error: ErrorResponse,
                  unauthorised: Callable[[], JSONResponse]) -> None:
    """Add the `/_admin/faults`, `/_admin/stats` and `/_admin/stats/reset` endpoints, guarded by `authorised`."""

    def guarded(handler: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Any]]:
        async def endpoint(request: Request):
            return await handler(request) if authorised(request) else unauthorised()
        return endpoint

    async def faults(request: Request):
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("body must be a JSON object")
            set_faults(app, **changes)
        except ValueError as exc:
            return error(400, str(exc))
        return asdict(app.state.faults)

    async def stats(request: Request):
        return app.state.stats.snapshot()

    async def reset_stats(request: Request):
        app.state.stats.reset()
        return app.state.stats.snapshot()

    app.add_api_route("/_admin/faults", guarded(faults), methods=["POST"])
    app.add_api_route("/_admin/stats", guarded(stats), methods=["GET"])
    app.add_api_route("/_admin/stats/reset", guarded(reset_stats), methods=["POST"])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ApiServer:
    """An app on a background uvicorn thread; use as a context manager or start()/stop()."""

    name = "API"  # "<name> simulator did not start on ..."

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self.host = host
        self.port = port or free_port(host)
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0):
        import uvicorn

        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"{self.name} simulator :{self.port}",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} simulator did not start on {self.base_url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_faults(self, **changes: Any) -> Faults:
        return set_faults(self.app, **changes)

    def reset(self) -> None:
        """Back to a well-behaved API with zeroed counters."""
        self.app.state.faults = Faults()
        self.app.state.error_rng = random.Random(self.app.state.faults.seed)
        self.app.state.stats.reset()

    def stats(self) -> dict:
        return self.app.state.stats.snapshot()


def simulator_parser(description: str, port: int) -> argparse.ArgumentParser:
    """The flags every simulator's `python -m` takes; the caller adds its own credentials."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--people", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rate-limit-every", type=int, default=0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--slow-seconds", type=float, default=0.0)
    return parser


def faults_from_args(args: argparse.Namespace) -> Faults:
    return Faults(rate_limit_every=args.rate_limit_every, error_rate=args.error_rate, slow_seconds=args.slow_seconds)


def run_standalone(argv: Sequence[str] | None, description: str, port: int,
                   credentials: Sequence[tuple[str, str, str]],
                   build: Callable[[argparse.Namespace, tuple[Sequence, int, datetime], Faults], tuple[FastAPI, str]]
                   ) -> None:
    """A simulator's `main`: parse the common flags plus `credentials`, build the app, print a banner, serve.

    `credentials` are (flag, environment variable that is its default, help), all required;
    `build(args, (people, seed, now), faults)` returns the app and the banner.
    """
    from crm_sync.simulators.people import generate_people

    parser = simulator_parser(description, port)
    for flag, env, text in credentials:
        parser.add_argument(flag, default=os.environ.get(env), help=f"{text} (default: ${env})")
    args = parser.parse_args(argv)
    if not all(getattr(args, flag.lstrip("-").replace("-", "_")) for flag, _, _ in credentials):
        parser.error(f"give {' and '.join(c[0] for c in credentials)} or set {' and '.join(c[1] for c in credentials)}")
    import uvicorn

    # Standalone runs serve "today's" data, so the wall clock is the right `now` here.
    world = (generate_people(args.people, args.seed), args.seed, datetime.now(timezone.utc))
    app, banner = build(args, world, faults_from_args(args))
    print(banner, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


class OrderedView:
    """Records of a store in (timestamp, id) order, sorted once and re-sorted only when they change.

    A page is then a bisect and a slice, not a parse-filter-sort of every record: at 100,000
    records a sync of 500 pages no longer spends minutes inside the simulator. Whether the records
    changed is read from a cheap signature of the fields the order and the filter depend on, so a
    test (or `apply_changes`) may edit records in place without telling the view.
    """

    def __init__(self, ts_field: str, id_field: str, group_field: str | None = None) -> None:
        self.ts_field, self.id_field, self.group_field = ts_field, id_field, group_field
        self._signature: int | None = None
        self._groups: dict = {}

    def _parse(self, text: str):
        from crm_sync.simulators.ticketing import _parse_ts

        return _parse_ts(text)

    def slice(self, records: list[dict], *, lower: datetime | None, upper: datetime | None,
              group=None) -> tuple[list[tuple], list[dict], int, int]:
        """(keys, records, lo, hi): positions lo..hi hold lower <= timestamp < upper, of one group
        when `group_field` is set (group None = all records). The lists are shared: do not modify."""
        from bisect import bisect_left

        g = self.group_field
        signature = hash(tuple((r[self.id_field], r[self.ts_field], r.get(g) if g else None) for r in records))
        if signature != self._signature:
            keyed = sorted((((self._parse(r[self.ts_field]), r[self.id_field]), r) for r in records),
                           key=lambda kr: kr[0])
            self._groups = {None: ([k for k, _ in keyed], [r for _, r in keyed])}
            if g:
                for value in {r.get(g) for r in records}:
                    part = [(k, r) for k, r in keyed if r.get(g) == value]
                    self._groups[value] = ([k for k, _ in part], [r for _, r in part])
            self._signature = signature
        keys, recs = self._groups.get(group, ([], []))
        lo = 0 if lower is None else bisect_left(keys, (lower, ""))
        hi = len(keys) if upper is None else bisect_left(keys, (upper, ""))
        return keys, recs, lo, hi


class Store:
    """An API simulator's in-memory records: thread-safe through `lock`, picklable between demo runs
    (the lock and the cached record orders are left out and rebuilt), pages read through `view`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["lock"]
        state.pop("_views", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def view(self, name: str, ts_field: str, id_field: str, group_field: str | None = None) -> OrderedView:
        """The cached ordered view of one record list (call with `lock` held)."""
        views = self.__dict__.setdefault("_views", {})
        if name not in views:
            views[name] = OrderedView(ts_field, id_field, group_field)
        return views[name]
