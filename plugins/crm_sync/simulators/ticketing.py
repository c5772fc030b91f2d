"""A SaaS ticketing desk on loopback: users and tickets behind a paged, rate-limited REST API.

Guarantees:
- `TicketingStore.generate(people, seed, now)` is deterministic: about half of the people become
  users (independently of the ERP, so many are in both sources and a few sign up twice), with
  names, phones and emails rendered by the same noisy functions as the ERP. `store.truth` maps
  user id -> person_id. Every `updated_at` is strictly before `now`.
- `GET /api/v2/users` and `GET /api/v2/tickets` honour exactly the contract that
  `crm_sync.sources.http_source.fetch_pages` relies on: `Authorization: Bearer <token>` (else a
  401 JSON error), `updated_since` inclusive, `updated_before` exclusive, `limit` 1..1000, and
  an opaque `cursor`; records come ordered by (updated_at, id) as `{"data": [...],
  "next_cursor": str | null}`. The cursor encodes the last (updated_at, id) returned, so paging
  stays stable while records change: every record inside the window is seen once, unless it is
  updated past the cursor, in which case it reappears later (as on the real desk).
- Faults (`apiserver.Faults`, re-exported here) are configured at construction or at runtime
  (`POST /_admin/faults`), and every call to the data endpoints is counted by endpoint and status
  (`GET /_admin/stats`), so tests can prove how many billed calls a sync made. Faults apply to the
  data endpoints only; the admin endpoints need the same token. Errors, fault answers included,
  are `{"error": str, "status": int}`. The cursor faults are honoured here: `cursor_stuck` answers
  the cursor it was sent, `cursor_replays` a fresh cursor for the same position (the same page
  comes again), and `first_page_total` adds `"total"` (records in the window) to a first page.
- `TicketingServer` (an `apiserver.ApiServer`) runs the app with uvicorn in a background thread on
  127.0.0.1 and returns from `start()` only once it answers. `python -m crm_sync.simulators.ticketing`
  runs it standalone.
"""
from __future__ import annotations

import base64
import hmac
import json
import random
from datetime import datetime, timedelta, timezone
from typing import Sequence

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse

# Faults is re-exported: callers import it from here
from crm_sync.simulators.apiserver import ApiServer, Faults, Store, install_admin, misbehave, new_app, run_standalone
from crm_sync.simulators.people import Person, render_email, render_name, render_phone

ENDPOINTS = {"users": "/api/v2/users", "tickets": "/api/v2/tickets"}
MAX_LIMIT = 1000
TICKET_STATUSES = ("new", "open", "pending", "hold", "solved", "closed")
TICKET_PRIORITIES = ("low", "normal", "high", "urgent")
_SUBJECTS = ("发票开错了，请重开", "订单一直没有发货", "无法登录账户", "申请退款", "产品使用咨询", "合同续签",
             "更换联系人电话", "物流信息不更新", "报价单请求", "售后维修预约", "Invoice copy needed", "API access request")


def _iso(ts: datetime, rng: random.Random) -> str:
    # Both UTC spellings occur in the wild; the client must accept either.
    text = ts.astimezone(timezone.utc).isoformat()
    return text.replace("+00:00", "Z") if rng.random() < 0.5 else text


def _parse_ts(text: str) -> datetime:
    # A '+' left unencoded in a query string arrives as a space.
    value = datetime.fromisoformat(text.strip().replace(" ", "+").replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no UTC offset")
    return value


def _record_ts(record: dict) -> datetime:
    return _parse_ts(record["updated_at"])


class TicketingStore(Store):
    """Users and tickets in memory, with the truth behind the users. Thread-safe."""

    def __init__(self, people: Sequence[Person] = (), users: list[dict] | None = None,
                 tickets: list[dict] | None = None, truth: dict[str, str] | None = None):
        super().__init__()
        self.people = list(people)
        self.users: list[dict] = users or []
        self.tickets: list[dict] = tickets or []
        self.truth: dict[str, str] = truth or {}


    @classmethod
    def generate(cls, people: Sequence[Person], seed: int, now: datetime) -> "TicketingStore":
        rng = random.Random(f"ticketing:{seed}")
        store = cls(people)
        chosen = [p for p in people if rng.random() < 0.5]
        twice = rng.sample(chosen, len(chosen) // 50)  # people who signed up again with another address
        entries = chosen + twice
        rng.shuffle(entries)
        for person in entries:
            store._add_user(person, rng, _before(rng, now, 30 * 86_400), now, tickets=rng.randint(0, 4))
        return store

    def _next_id(self, prefix: str, items: list[dict], width: int) -> str:
        return f"{prefix}-{len(items) + 1:0{width}d}"

    def _add_user(self, person: Person, rng: random.Random, updated_at: datetime, now: datetime, tickets: int) -> str:
        user_id = self._next_id("u", self.users, 6)
        created_at = min(updated_at, now - timedelta(days=rng.randint(1, 900), seconds=rng.randint(0, 86_399)))
        phone = (render_phone(person.landline, rng, extension=person.extension)
                 if person.landline and rng.random() < 0.25 else render_phone(person.mobile, rng))
        self.users.append({
            "id": user_id,
            "name": render_name(person, rng),
            "phone": phone,
            "email": render_email(person.email, rng),
            "organization": person.company if rng.random() < 0.8 else (person.company.replace("有限公司", "") or None),
            "created_at": _iso(created_at, rng),
            "updated_at": _iso(updated_at, rng),
        })
        self.truth[user_id] = person.person_id
        for _ in range(tickets):
            self._add_ticket(user_id, rng, _before(rng, now, 30 * 86_400))
        return user_id

    def _add_ticket(self, requester_id: str, rng: random.Random, updated_at: datetime) -> str:
        ticket_id = self._next_id("t", self.tickets, 7)
        created_at = updated_at - timedelta(seconds=rng.randint(0, 20 * 86_400))
        self.tickets.append({
            "id": ticket_id,
            "requester_id": requester_id,
            "subject": rng.choice(_SUBJECTS),
            "status": rng.choices(TICKET_STATUSES, (10, 20, 10, 5, 25, 30))[0],
            "priority": rng.choices(TICKET_PRIORITIES, (20, 55, 20, 5))[0],
            "created_at": _iso(created_at, rng),
            "updated_at": _iso(updated_at, rng),
        })
        return ticket_id

    def apply_changes(self, seed: int, now: datetime, n_updates: int = 30, n_new: int = 10,
                      window_seconds: int = 3_600) -> dict[str, list[str]]:
        """Touch `n_updates` users and tickets, add `n_new` users (with tickets); all in the `window_seconds` before `now`."""
        rng = random.Random(f"ticketing-changes:{seed}:{now.isoformat()}")
        changed: dict[str, list[str]] = {"updated_users": [], "new_users": [], "updated_tickets": [], "new_tickets": []}
        with self.lock:
            for user in rng.sample(self.users, min(n_updates, len(self.users))):
                if user["email"]:
                    user["email"] = user["email"].strip().lower()
                user["updated_at"] = _iso(_before(rng, now, window_seconds), rng)
                changed["updated_users"].append(user["id"])
            for ticket in rng.sample(self.tickets, min(n_updates, len(self.tickets))):
                ticket["status"] = {"new": "open", "open": "pending", "pending": "solved",
                                    "solved": "closed"}.get(ticket["status"], ticket["status"])
                ticket["updated_at"] = _iso(_before(rng, now, window_seconds), rng)
                changed["updated_tickets"].append(ticket["id"])
            known = set(self.truth.values())
            pool = [p for p in self.people if p.person_id not in known]
            for person in rng.sample(pool, min(n_new, len(pool))):
                before = len(self.tickets)
                user_id = self._add_user(person, rng, _before(rng, now, window_seconds), now, tickets=0)
                self._add_ticket(user_id, rng, _before(rng, now, window_seconds))
                changed["new_users"].append(user_id)
                changed["new_tickets"] += [t["id"] for t in self.tickets[before:]]
        return changed

    def page(self, kind: str, *, since: datetime | None, before: datetime | None, limit: int,
             after: tuple[datetime, str] | None) -> tuple[list[dict], tuple[datetime, str] | None]:
        """One page of `kind` in (updated_at, id) order, and the key to continue after, if any."""
        from bisect import bisect_right

        with self.lock:
            view = self.view(kind, "updated_at", "id")
            keys, records, lo, hi = view.slice(self.users if kind == "users" else self.tickets,
                                               lower=since, upper=before)
            start = max(lo, bisect_right(keys, after, lo, hi)) if after is not None else lo
            end = min(start + limit, hi)
            return [dict(r) for r in records[start:end]], (keys[end - 1] if end < hi else None)

    def count(self, kind: str, *, since: datetime | None, before: datetime | None) -> int:
        """How many records of `kind` the window holds."""
        with self.lock:
            _, _, lo, hi = self.view(kind, "updated_at", "id").slice(self.users if kind == "users" else self.tickets,
                                                                     lower=since, upper=before)
            return hi - lo


def _before(rng: random.Random, now: datetime, max_seconds: int) -> datetime:
    return now - timedelta(seconds=rng.randint(1, max_seconds), microseconds=rng.randint(0, 999) * 1000)


def encode_cursor(key: tuple[datetime, str], nonce: int | None = None) -> str:
    # a nonce makes another spelling of the same position (the cursor_replays fault)
    raw = json.dumps([key[0].isoformat(), key[1]] + ([nonce] if nonce is not None else [])).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    ts, record_id = json.loads(raw)[:2]
    return _parse_ts(ts), str(record_id)


def create_app(store: TicketingStore, token: str, faults: Faults | None = None):
    """The FastAPI app; `app.state.faults` and `app.state.stats` are the live settings and counters."""
    if not token:
        raise ValueError("the ticketing simulator needs a non-empty API token")
    app = new_app("ticketing desk simulator", faults)

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)

    def authorised(request: Request) -> bool:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())

    async def serve(kind: str, request: Request) -> JSONResponse:
        endpoint = ENDPOINTS[kind]
        response = await answer(kind, request)
        app.state.stats.record(endpoint, response.status_code)
        return response

    async def answer(kind: str, request: Request) -> JSONResponse:
        if not authorised(request):
            return error(401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
        fault = await misbehave(app, error)
        if fault is not None:
            return fault
        q = request.query_params
        try:
            since = _parse_ts(q["updated_since"]) if q.get("updated_since") else None
            before = _parse_ts(q["updated_before"]) if q.get("updated_before") else None
            limit = int(q.get("limit", 100))
            after = decode_cursor(q["cursor"]) if q.get("cursor") else None
        except (ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
            return error(400, f"invalid query parameter: {exc}")
        if not 1 <= limit <= MAX_LIMIT:
            return error(400, f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
        records, last = store.page(kind, since=since, before=before, limit=limit, after=after)
        body = {"data": records, "next_cursor": encode_cursor(last) if last else None}
        f: Faults = app.state.faults
        if after is not None and last is not None and f.cursor_stuck:
            body["next_cursor"] = q["cursor"]
        elif after is not None and last is not None and f.cursor_replays:
            body["next_cursor"] = encode_cursor(after, nonce=app.state.stats.requests)
        if after is None and f.first_page_total:
            body["total"] = store.count(kind, since=since, before=before)
        return JSONResponse(body)

    @app.get(ENDPOINTS["users"])
    async def users(request: Request):
        return await serve("users", request)

    @app.get(ENDPOINTS["tickets"])
    async def tickets(request: Request):
        return await serve("tickets", request)

    install_admin(app, authorised, error, unauthorised=lambda: error(401, "missing or invalid bearer token"))
    return app


class TicketingServer(ApiServer):
    """The ticketing simulator on a background uvicorn thread; use as a context manager or start()/stop()."""

    name = "ticketing"

    def __init__(self, store: TicketingStore, token: str, host: str = "127.0.0.1", port: int = 0,
                 faults: Faults | None = None):
        super().__init__(create_app(store, token, faults), host=host, port=port)
        self.store = store


def main(argv: Sequence[str] | None = None) -> None:
    def build(args, world, faults):
        store = TicketingStore.generate(*world)
        return create_app(store, args.token, faults), (
            f"ticketing simulator: {len(store.users)} users, {len(store.tickets)} tickets "
            f"on http://{args.host}:{args.port}")

    run_standalone(argv, "Run the ticketing desk simulator on loopback.", 8765,
                   [("--token", "TICKETING_API_TOKEN", "bearer token clients must present")], build)


if __name__ == "__main__":
    main()
