"""A call center's CDR feed on loopback: call detail records behind a Basic-auth, offset-paged REST API.

Guarantees:
- `CallCenterStore.generate(people, seed, now)` is deterministic: about 30% of the people have 1-5
  calls in the 30 days before `now` (inbound and outbound), and about 5% of all calls are with
  numbers that belong to nobody in the pool, some of them repeatedly: orphans for the pipeline.
  `store.truth` maps call_id -> person_id (None for those), `store.unknown_numbers` holds their
  canonical numbers, and `store.numbers` maps call_id -> the canonical number the switch saw.
- Callers are drawn independently of the other sources, so some are not customers anywhere yet
  and their number only becomes known to the CRM when the ERP or the desk adds them later;
  `apply_changes` keeps bringing in first-time callers.
- The customer's side of a call (`caller` inbound, `callee` outbound; the other side is a company
  hotline) is the person's mobile mostly and their landline with extension sometimes, spelled as
  switches and trunks write them: `13800138000`, `+86 138 0013 8000`, `0086-13800138000`,
  `138-0013-8000`, full-width `１３８００１３８０００`, `010-87654321转123`, `(010)87654321-123`,
  `+86 10 8765 4321 ext 123`, and the bare switchboard `010-87654321` when the PBX drops the
  extension. Caller id comes from the carrier, so it is never missing or truncated.
- Late arrival: a call is written only after it ends, so `created_at` = start_time + duration + a
  delay of 1-15 minutes. Timestamps are whole seconds with a `+08:00` offset; every `created_at`
  is strictly before the `now` given to `generate`/`apply_changes`. Records never change once
  written, and call ids grow with created_at.
- `apply_changes(seed, now, n_new, window_seconds)` adds `n_new` calls whose created_at lies in the
  `window_seconds` before `now`; when `n_new >= 1` at least one of them started before the window.
- `GET /api/v1/cdr` needs HTTP Basic credentials (else 401, `WWW-Authenticate: Basic realm="cdr"`,
  body `{"error": "unauthorized"}`) and takes `created_from` (inclusive) and `created_to`
  (exclusive) as ISO-8601 with offset (a '+' arriving as a space is accepted), `offset` >= 0
  (default 0) and `limit` 1..1000 (default 100); anything else is a 400 `{"error": ...}`. The body
  is a JSON list of records ordered by (created_at, call_id); `X-Total-Count` is the number of
  records in the window and, while more follow, `Link: <absolute URL with offset+limit>;
  rel="next"`. Offset paging is stable because a window that ends at or before the store's last
  `now` never changes.
- Faults (`apiserver.Faults`, re-exported here) are configured at construction or at runtime
  (`POST /_admin/faults`) and apply to the data endpoint only, answering `{"error": ...}`;
  `GET /_admin/stats` counts its calls by status. The admin endpoints need the same credentials.
- `CallCenterServer` (an `apiserver.ApiServer`) runs the app with uvicorn in a background thread on
  127.0.0.1 and returns from `start()` only once it answers. `python -m crm_sync.simulators.callcenter`
  runs it standalone (default port 8767).
"""
from __future__ import annotations

import base64
import binascii
import hmac
import random
from datetime import datetime, timedelta, timezone
from typing import Sequence

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse

# Faults is re-exported: callers import it from here
from crm_sync.simulators.apiserver import ApiServer, Faults, Store, install_admin, misbehave, new_app, run_standalone
from crm_sync.simulators.people import CITIES, Person, render_phone
from crm_sync.simulators.ticketing import _parse_ts

ENDPOINT = "/api/v1/cdr"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
CST = timezone(timedelta(hours=8), "CST")
REALM = "cdr"

HOTLINES = ("400-820-8820", "400-820-8820", "010-46008820转8001", "010-46008820转8002")
QUEUES = ("售前", "售后", "VIP")
DISPOSITIONS = (("已解决",), ("咨询",), ("回访",), ("投诉",), ("回访", "投诉"), ("转工单",), ("已解决", "回访"), ())
AGENTS = (("A1001", "周晓梅"), ("A1002", "陈立"), ("A1003", "王静"), ("A1004", "李浩然"), ("A1005", "赵欣怡"),
          ("A1006", "孙鹏"), ("A1007", "刘婷"), ("A1008", "何俊"), ("A1009", "郭佳"), ("A1010", "林雪"))

# Mobile spellings are people.PHONE_VARIANTS minus missing/invalid: the carrier always delivers caller id.
MOBILE_FORMS = ("plain", "intl_spaced", "intl_00", "dashed", "fullwidth", "intl_bare", "intl_paren")
_MOBILE_WEIGHTS = (30, 16, 12, 14, 14, 7, 7)
LANDLINE_FORMS = ("zhuan", "paren", "intl", "switchboard")
_LANDLINE_WEIGHTS = (35, 25, 25, 15)
_ORPHAN_PREFIXES = ("170", "171", "162", "165", "167", "138", "186")  # virtual operators are over-represented

ORPHAN_SHARE = 0.05
CALLER_SHARE = 0.30
LANDLINE_SHARE = 0.20          # of calls by a person who has a landline
INBOUND_SHARE = 0.75
MISSED_SHARE = {"inbound": 0.10, "outbound": 0.20}
RECORDING_KEPT = 0.90


def render_number(number: str, rng: random.Random, *, extension: str | None = None, form: str | None = None) -> str:
    """One spelling of a mobile ("13800138000") or a landline ("010-87654321" plus extension) as a CDR writes it."""
    if "-" not in number:
        form = form or rng.choices(MOBILE_FORMS, _MOBILE_WEIGHTS)[0]
        rendered = render_phone(number, rng, variant=form)
        assert rendered is not None  # only the "missing" variant renders None, and it is not offered
        return rendered
    area, local = number.split("-", 1)
    form = form or rng.choices(LANDLINE_FORMS, _LANDLINE_WEIGHTS)[0]
    if form == "switchboard":
        return number
    if form == "intl":
        spelled = f"+86 {area[1:]} {local[:4]} {local[4:]}"
        return f"{spelled} ext {extension}" if extension else spelled
    if form == "paren":
        return f"({area}){local}-{extension}" if extension else f"({area}){local}"
    return f"{number}转{extension}" if extension else number


def _iso(ts: datetime) -> str:
    return ts.astimezone(CST).isoformat(timespec="seconds")


def _whole_seconds(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("`now` must be timezone-aware")
    return now.astimezone(CST).replace(microsecond=0)


class CallCenterStore(Store):
    """Call detail records in memory, with the truth behind the numbers. Thread-safe."""

    def __init__(self, people: Sequence[Person] = ()):
        super().__init__()
        self.people = list(people)
        self.calls: list[dict] = []
        self.truth: dict[str, str | None] = {}
        self.numbers: dict[str, str] = {}
        self.unknown_numbers: set[str] = set()


    @classmethod
    def generate(cls, people: Sequence[Person], seed: int, now: datetime) -> "CallCenterStore":
        rng = random.Random(f"callcenter:{seed}")
        now = _whole_seconds(now)
        store = cls(people)
        drafts = []
        for person in people:
            if rng.random() < CALLER_SHARE:
                for _ in range(rng.randint(1, 5)):
                    drafts.append(store._draft(person, rng, now - timedelta(seconds=rng.randint(1, 30 * 86_400))))
        for _ in range(round(len(drafts) * ORPHAN_SHARE / (1 - ORPHAN_SHARE))):
            drafts.append(store._draft(None, rng, now - timedelta(seconds=rng.randint(1, 30 * 86_400))))
        store._commit(drafts)
        return store

    def apply_changes(self, seed: int, now: datetime, n_new: int = 30,
                      window_seconds: int = 3_600) -> dict[str, list[str]]:
        """Add `n_new` calls created in the `window_seconds` before `now`; some started before the window."""
        if window_seconds < 1:
            raise ValueError("window_seconds must be at least 1")
        rng = random.Random(f"callcenter-changes:{seed}:{now.isoformat()}")
        now = _whole_seconds(now)
        window_start = now - timedelta(seconds=window_seconds)
        with self.lock:
            callers = {pid for pid in self.truth.values() if pid is not None}
            returning = [p for p in self.people if p.person_id in callers]
            first_time = [p for p in self.people if p.person_id not in callers]
            drafts, new_callers = [], []
            for i in range(n_new):
                person: Person | None = None
                if rng.random() >= ORPHAN_SHARE:
                    pool = first_time if (rng.random() < 0.3 or not returning) and first_time else returning
                    person = rng.choice(pool) if pool else None
                    if person is not None and person in first_time:
                        first_time.remove(person)
                        returning.append(person)
                        new_callers.append(person.person_id)
                delay = rng.randint(60, 900)
                # the first new call ended close enough to the window's start to have begun before it
                back = (rng.randint(max(1, window_seconds - delay + 1), window_seconds) if i == 0
                        else rng.randint(1, window_seconds))
                drafts.append(self._draft(person, rng, now - timedelta(seconds=back), delay=delay))
            added = self._commit(drafts)
        return {
            "new_calls": [c["call_id"] for c in added],
            "late_arrivals": [c["call_id"] for c in added if _parse_ts(c["start_time"]) < window_start],
            "orphan_calls": [c["call_id"] for c in added if self.truth[c["call_id"]] is None],
            "new_callers": new_callers,
        }

    def _unknown_number(self, rng: random.Random) -> str:
        if self.unknown_numbers and rng.random() < 0.3:  # a prospect or a spammer who calls again
            return rng.choice(sorted(self.unknown_numbers))
        if rng.random() < 0.2:
            # people's landlines start with 5-8 after the area code; 2-4 can belong to nobody
            return f"{rng.choice(sorted(set(CITIES.values())))}-{rng.randint(2, 4)}{rng.randint(0, 9_999_999):07d}"
        mobiles = {p.mobile for p in self.people}
        while (number := rng.choice(_ORPHAN_PREFIXES) + f"{rng.randint(0, 99_999_999):08d}") in mobiles:
            pass
        return number

    def _draft(self, person: Person | None, rng: random.Random, created_at: datetime,
               delay: int | None = None) -> dict:
        """A call without its id: everything but the id is decided here, from `rng` only."""
        extension = None
        if person is None:
            number = self._unknown_number(rng)
            self.unknown_numbers.add(number)
        elif person.landline and rng.random() < LANDLINE_SHARE:
            number, extension = person.landline, person.extension
        else:
            number = person.mobile
        direction = "inbound" if rng.random() < INBOUND_SHARE else "outbound"
        customer = render_number(number, rng, extension=extension)
        hotline = rng.choice(HOTLINES)
        missed = rng.random() < MISSED_SHARE[direction]
        duration = 0 if missed else min(3_600, max(5, int(rng.lognormvariate(5.0, 0.9))))
        delay = rng.randint(60, 900) if delay is None else delay
        start = created_at - timedelta(seconds=duration + delay)
        # a missed inbound call was abandoned in the IVR (no queue) or in a queue; nobody picked up
        answered_by = None if missed and direction == "inbound" else rng.choice(AGENTS)
        if direction == "inbound":
            queue = None if missed and rng.random() < 0.5 else rng.choices(QUEUES, (45, 45, 10))[0]
        else:
            queue = None
        return {
            "person_id": person.person_id if person else None,
            "number": f"{number}转{extension}" if extension else number,
            "caller": customer if direction == "inbound" else hotline,
            "callee": hotline if direction == "inbound" else customer,
            "direction": direction,
            "start_time": start,
            "duration": duration,
            "agent": answered_by,
            "queue": queue,
            "disposition": [] if missed else list(rng.choices(DISPOSITIONS, (30, 20, 12, 8, 6, 8, 6, 10))[0]),
            "keep_recording": not missed and rng.random() < RECORDING_KEPT,
            "created_at": created_at,
        }

    def _commit(self, drafts: list[dict]) -> list[dict]:
        """Number the drafts in created_at order after the existing calls, store and return them."""
        drafts.sort(key=lambda d: (d["created_at"], d["start_time"]))
        first = len(self.calls)
        for draft in drafts:
            call_id = f"c{len(self.calls) + 1:09d}"
            start: datetime = draft["start_time"]
            self.calls.append({
                "call_id": call_id,
                "caller": draft["caller"],
                "callee": draft["callee"],
                "direction": draft["direction"],
                "start_time": _iso(start),
                "duration": draft["duration"],
                "agent_id": draft["agent"][0] if draft["agent"] else None,
                "agent_name": draft["agent"][1] if draft["agent"] else None,
                "queue": draft["queue"],
                "disposition": draft["disposition"],
                "recording_url": (f"https://rec.example.invalid/{start.astimezone(CST):%Y/%m/%d}/{call_id}.mp3"
                                  if draft["keep_recording"] else None),
                "created_at": _iso(draft["created_at"]),
            })
            self.truth[call_id] = draft["person_id"]
            self.numbers[call_id] = draft["number"]
        return self.calls[first:]

    def window(self, created_from: datetime | None, created_to: datetime | None) -> list[dict]:
        """The calls with created_from <= created_at < created_to, ordered by (created_at, call_id)."""
        with self.lock:
            view = self.view("calls", "created_at", "call_id")
            _, records, lo, hi = view.slice(self.calls, lower=created_from, upper=created_to)
            return records[lo:hi]


def create_app(store: CallCenterStore, login: str, password: str, faults: Faults | None = None):
    """The FastAPI app; `app.state.faults` and `app.state.stats` are the live settings and counters."""
    if not login or not password:
        raise ValueError("the call center simulator needs a non-empty login and password")
    app = new_app("call center CDR simulator", faults)
    expected = f"{login}:{password}".encode()

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def unauthorised() -> JSONResponse:
        return error(401, "unauthorized", {"WWW-Authenticate": f'Basic realm="{REALM}"'})

    def authorised(request: Request) -> bool:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(presented.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(decoded, expected)

    async def answer(request: Request) -> JSONResponse:
        if not authorised(request):
            return unauthorised()
        fault = await misbehave(app, error)
        if fault is not None:
            return fault
        q = request.query_params
        try:
            created_from = _parse_ts(q["created_from"]) if q.get("created_from") else None
            created_to = _parse_ts(q["created_to"]) if q.get("created_to") else None
            offset = int(q.get("offset", 0))
            limit = int(q.get("limit", DEFAULT_LIMIT))
        except ValueError as exc:
            return error(400, f"invalid query parameter: {exc}")
        if not 1 <= limit <= MAX_LIMIT:
            return error(400, f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
        if offset < 0:
            return error(400, f"offset must be >= 0, got {offset}")
        records = store.window(created_from, created_to)
        headers = {"X-Total-Count": str(len(records))}
        if offset + limit < len(records):
            next_url = request.url.include_query_params(offset=offset + limit, limit=limit)
            headers["Link"] = f'<{next_url}>; rel="next"'
        return JSONResponse(records[offset:offset + limit], headers=headers)

    @app.get(ENDPOINT)
    async def cdr(request: Request):
        response = await answer(request)
        app.state.stats.record(ENDPOINT, response.status_code)
        return response

    install_admin(app, authorised, error, unauthorised)
    return app


class CallCenterServer(ApiServer):
    """The call center simulator on a background uvicorn thread; use as a context manager or start()/stop()."""

    name = "call center"

    def __init__(self, store: CallCenterStore, login: str, password: str, faults: Faults | None = None,
                 host: str = "127.0.0.1", port: int = 0):
        super().__init__(create_app(store, login, password, faults), host=host, port=port)
        self.store = store


def main(argv: Sequence[str] | None = None) -> None:
    def build(args, world, faults):
        store = CallCenterStore.generate(*world)
        return create_app(store, args.login, args.password, faults), (
            f"call center simulator: {len(store.calls)} calls ({sum(v is None for v in store.truth.values())} "
            f"from unknown numbers) on http://{args.host}:{args.port}{ENDPOINT}")

    run_standalone(argv, "Run the call center CDR simulator on loopback.", 8767,
                   [("--login", "CALLCENTER_API_LOGIN", "Basic auth login"),
                    ("--password", "CALLCENTER_API_PASSWORD", "Basic auth password")], build)


if __name__ == "__main__":
    main()
