"""An enterprise IM (WeCom-style chat) on loopback: external contacts and chat sessions behind a paged API.

Guarantees:
- `ImStore.generate(people, seed, now)` is deterministic: about 40% of the people become contacts
  (independently of the other sources), and a few are added by two sales reps, so one person has two
  `external_userid`s. Nicknames are what the customer chose (emoji, latin, slogans); remark names,
  mobiles and e-mails are rendered by the same noisy functions as the other sources. Each contact has
  0-4 sessions, about 80% closed. `store.truth` maps every served external_userid -> person_id.
  Every timestamp is strictly before `now`, most with a `+08:00` offset and some with `Z`.
- About 3% of the sessions belong to contacts the contacts endpoint does not serve yet (a customer who
  chatted with customer service before a rep added them): `store.orphan_sessions` maps those session
  ids to their external_userid, and `store.pending_contacts` holds the contacts themselves.
  `apply_changes` publishes every pending contact (with an `updated_at` inside the window) and leaves
  the orphan sessions untouched, so a pipeline must link held sessions when the contact arrives.
- `apply_changes(seed, now, ...)` edits remark names, closes open sessions and adds new contacts with
  sessions; everything it touches gets `updated_at` in `[now - window_seconds, now)`. A closed
  session always has `started_at <= ended_at <= updated_at`; an open one has `ended_at` None.
- `GET /open/v1/contacts` and `GET /open/v1/sessions` need `X-Api-Key` (else 401 with errcode
  40001), filter `modified_from` inclusive and `modified_to` exclusive, page by number (`page` from 1,
  `page_size` 1..500, else 400), and order by (updated_at, id). A page past the end is empty, not an
  error. Sessions also filter on `status` (open/closed). Every answer is
  `{"errcode": int, "errmsg": str, ...}`; data comes as `result.items` with page, page_size, total
  and total_pages. Page-number paging is not stable while records change: a record updated during a
  sync moves to a later page, as on the real platform.
- Faults (`apiserver.Faults`, re-exported here) apply to the data endpoints only and answer in the same
  errcode/errmsg shape; `POST /_admin/faults`, `GET /_admin/stats` and `POST /_admin/stats/reset`
  need the same key. `ImServer` (an `apiserver.ApiServer`) runs the app with uvicorn in a background
  thread on 127.0.0.1 and returns from `start()` only once it answers.
  `python -m crm_sync.simulators.im` runs it standalone.
"""
from __future__ import annotations

import hmac
import math
import random
from datetime import datetime, timedelta, timezone
from typing import Sequence

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse

from crm_sync.simulators.apiserver import ApiServer, Faults, Store, install_admin, misbehave, new_app, run_standalone
from crm_sync.simulators.people import CITIES, Person, render_email, render_name, render_phone
from crm_sync.simulators.ticketing import _before, _parse_ts

__all__ = ["ENDPOINTS", "Faults", "ImServer", "ImStore", "create_app", "main"]

ENDPOINTS = {"contacts": "/open/v1/contacts", "sessions": "/open/v1/sessions"}
ID_FIELD = {"contacts": "external_userid", "sessions": "session_id"}
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50
CHANNELS = ("single_chat", "group_chat", "wechat_kf")
SESSION_STATUSES = ("open", "closed")
SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")

# errcodes in the WeCom style; only 0 and 40001 are part of the pipeline's contract
ERR_OK, ERR_API_KEY, ERR_PARAM, ERR_FREQ, ERR_BUSY = 0, 40001, 40058, 45009, -1
_ERRCODES = {400: ERR_PARAM, 401: ERR_API_KEY, 429: ERR_FREQ}  # any other error status: ERR_BUSY
_FAULT_MESSAGES = {"outage": "system busy (outage)", "rate_limited": "api freq out of limit", "flaky": "system busy",
                   "internal": "system error", "unavailable": "system busy"}

_AGENTS = ("zhangwei", "LiNa", "wangqiang", "chenjing", "liuyang", "HuangMin", "zhaolei", "sunli")
_LATIN = {"M": ("Tony", "Kevin", "Jack", "David", "Leo", "Eric", "Frank", "Sam"),
          "F": ("Amy", "Coco", "Linda", "Vivian", "Cherry", "Grace", "Lily", "Nina")}
_EMOJI = ("🐟", "🌸", "🍀", "☀️", "🐱", "🌙", "🍵", "✨", "🚀", "🏀")
_SLOGANS = ("阳光总在风雨后", "岁月静好", "知足常乐", "天道酬勤", "平安是福", "简单就好", "A.北京-装修", "随遇而安")
_POSITIONS = ("采购经理", "总经理", "销售总监", "行政主管", "财务", "IT主管", "采购专员", "工程师", "运营经理", "法务")
_SUMMARIES = ("咨询报价，已发送产品手册", "询问发货时间，已告知物流单号", "售后维修预约，已安排工程师", "要求重开发票",
              "合同续签沟通，待客户确认", "投诉配送延迟，已致歉并补偿", "咨询API对接方式", "索取样品，已登记地址",
              "询问账期与付款方式", "更换联系人电话", "演示预约，约定下周二", "对价格有异议，申请特批折扣")
_TAGS = ("报价", "售后", "发票", "物流", "合同", "投诉", "技术支持", "样品", "付款", "意向客户", "VIP")


def _iso(ts: datetime, rng: random.Random) -> str:
    # The platform speaks Beijing time, but an API gateway in front of part of it answers in UTC.
    if rng.random() < 0.8:
        return ts.astimezone(SHANGHAI).isoformat()
    return ts.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _between(rng: random.Random, low: datetime, high: datetime) -> datetime:
    """A moment in [low, high), whole milliseconds after `low`."""
    span_ms = max(0, int((high - low).total_seconds() * 1000) - 1)
    return low + timedelta(milliseconds=rng.randint(0, span_ms))


def _short_company(company: str, rng: random.Random) -> str:
    core = company.removesuffix("有限公司")
    city = next((c for c in CITIES if core.startswith(c)), "")
    # "北京华信科技" / "华信科技" / "华信"
    return rng.choice((core, core[len(city):], core[len(city):len(city) + 2]))


def _nickname(person: Person, rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.30:
        return person.name
    if roll < 0.55:
        return rng.choice(_LATIN[person.gender]) + (rng.choice(_EMOJI) if rng.random() < 0.6 else "")
    if roll < 0.70:
        return rng.choice(_EMOJI) + person.given_name + (rng.choice(_EMOJI) if rng.random() < 0.3 else "")
    if roll < 0.85:
        return rng.choice(_SLOGANS)
    return render_name(person, rng, variant="pinyin")


def _remark_name(person: Person, rng: random.Random) -> str | None:
    roll = rng.random()
    if roll < 0.10:
        return None
    title = "先生" if person.gender == "M" else "女士"
    if roll < 0.30:
        return person.surname + title
    if roll < 0.50:
        return f"{person.name}-{_short_company(person.company, rng)}"
    if roll < 0.60:
        return person.surname + "总"
    if roll < 0.70:
        return f"{_short_company(person.company, rng)} {person.surname}{title}"
    return render_name(person, rng)


class ImStore(Store):
    """Contacts and sessions in memory, with the truth behind the contacts. Thread-safe."""

    def __init__(self, people: Sequence[Person] = ()):
        super().__init__()
        self.people = list(people)
        self.contacts: list[dict] = []
        self.sessions: list[dict] = []
        self.truth: dict[str, str] = {}                  # served external_userid -> person_id
        self.pending_contacts: dict[str, dict] = {}      # external_userid -> contact not served yet
        self.pending_truth: dict[str, str] = {}          # its person_id
        self.orphan_sessions: dict[str, str] = {}        # session_id -> external_userid of a pending contact


    @classmethod
    def generate(cls, people: Sequence[Person], seed: int, now: datetime) -> "ImStore":
        rng = random.Random(f"im:{seed}")
        store = cls(people)
        chosen = [p for p in people if rng.random() < 0.4]
        twice = rng.sample(chosen, len(chosen) // 25)  # added by a second sales rep
        chosen_ids = {p.person_id for p in chosen}
        strangers = [p for p in people if p.person_id not in chosen_ids]
        pending = rng.sample(strangers, min(len(strangers), max(1, round(0.03 * len(chosen + twice)))))
        entries = [(p, False) for p in chosen + twice] + [(p, True) for p in pending]
        rng.shuffle(entries)
        for person, is_pending in entries:
            updated_at = _before(rng, now, 30 * 86_400)
            created_at = now - timedelta(days=rng.randint(31, 900), seconds=rng.randint(0, 86_399))
            user_id = store._add_contact(person, rng, created_at, updated_at, pending=is_pending)
            for _ in range(rng.randint(1, 3) if is_pending else rng.randint(0, 4)):
                store._add_session(user_id, rng, _before(rng, now, 30 * 86_400),
                                   channel="wechat_kf" if is_pending and rng.random() < 0.7 else None)
        return store

    def _new_userid(self, rng: random.Random) -> str:
        taken = self.truth.keys() | self.pending_contacts.keys()
        while (user_id := f"wm{rng.getrandbits(64):016x}") in taken:
            pass
        return user_id

    def _add_contact(self, person: Person, rng: random.Random, created_at: datetime, updated_at: datetime,
                     pending: bool = False) -> str:
        user_id = self._new_userid(rng)
        corp = rng.random()
        contact = {
            "external_userid": user_id,
            "nickname": _nickname(person, rng),
            "remark_name": _remark_name(person, rng),
            "mobile": render_phone(person.mobile, rng) if rng.random() < 0.75 else None,
            "email": render_email(person.email, rng) if rng.random() < 0.35 else None,
            "corp_name": None if corp < 0.15 else person.company if corp < 0.75 else _short_company(person.company, rng),
            "position": rng.choice(_POSITIONS) if rng.random() < 0.6 else None,
            "gender": rng.choices((1 if person.gender == "M" else 2, 0), (85, 15))[0],
            "created_at": _iso(min(created_at, updated_at), rng),
            "updated_at": _iso(updated_at, rng),
        }
        if pending:
            self.pending_contacts[user_id] = contact
            self.pending_truth[user_id] = person.person_id
        else:
            self.contacts.append(contact)
            self.truth[user_id] = person.person_id
        return user_id

    def _add_session(self, user_id: str, rng: random.Random, updated_at: datetime, channel: str | None = None,
                     closed: bool | None = None) -> str:
        session_id = f"s-{len(self.sessions) + 1:07d}"
        closed = rng.random() < 0.8 if closed is None else closed
        duration = timedelta(seconds=rng.choice((rng.randint(60, 3_600), rng.randint(3_600, 3 * 86_400))))
        ended_at = updated_at - timedelta(seconds=rng.randint(0, 600)) if closed else None
        started_at = (ended_at or updated_at) - duration
        self.sessions.append({
            "session_id": session_id,
            "external_userid": user_id,
            "channel": channel or rng.choices(CHANNELS, (65, 20, 15))[0],
            "status": "closed" if closed else "open",
            "started_at": _iso(started_at, rng),
            "ended_at": _iso(ended_at, rng) if ended_at else None,
            "message_count": rng.randint(1, 120),
            "summary": rng.choice(_SUMMARIES),
            "tags": sorted(rng.sample(_TAGS, rng.choice((0, 1, 1, 2, 2, 3)))),
            "agent_userid": rng.choice(_AGENTS),
            "updated_at": _iso(updated_at, rng),
        })
        if user_id in self.pending_contacts:
            self.orphan_sessions[session_id] = user_id
        return session_id

    def apply_changes(self, seed: int, now: datetime, n_updates: int = 30, n_new: int = 10,
                      window_seconds: int = 3_600) -> dict[str, list[str]]:
        """Edit `n_updates` remark names, close up to `n_updates` open sessions, publish every pending
        contact and add `n_new` new contacts (with sessions); all in the `window_seconds` before `now`.

        `linked_sessions` lists the orphan sessions whose contact has now been published; their own
        records are not touched.
        """
        rng = random.Random(f"im-changes:{seed}:{now.isoformat()}")
        start = now - timedelta(seconds=window_seconds)
        changed: dict[str, list[str]] = {"updated_contacts": [], "new_contacts": [], "closed_sessions": [],
                                         "new_sessions": [], "linked_sessions": []}
        with self.lock:
            by_person = {p.person_id: p for p in self.people}
            for contact in rng.sample(self.contacts, min(n_updates, len(self.contacts))):
                person = by_person[self.truth[contact["external_userid"]]]
                old = contact["remark_name"]
                for _ in range(5):  # a rep who edits the remark usually changes it
                    if (remark := _remark_name(person, rng)) != old:
                        break
                contact["remark_name"] = remark
                contact["updated_at"] = _iso(_between(rng, start, now), rng)
                changed["updated_contacts"].append(contact["external_userid"])

            open_sessions = [s for s in self.sessions if s["status"] == "open"]
            for session in rng.sample(open_sessions, min(n_updates, len(open_sessions))):
                ended_at = _between(rng, max(start, _parse_ts(session["started_at"])), now)
                session["status"] = "closed"
                session["ended_at"] = _iso(ended_at, rng)
                session["updated_at"] = _iso(_between(rng, ended_at, now), rng)
                session["message_count"] += rng.randint(1, 20)
                changed["closed_sessions"].append(session["session_id"])

            for user_id in sorted(self.pending_contacts):
                contact = self.pending_contacts.pop(user_id)
                published = _between(rng, start, now)
                contact["created_at"] = contact["updated_at"] = _iso(published, rng)
                self.contacts.append(contact)
                self.truth[user_id] = self.pending_truth.pop(user_id)
                changed["new_contacts"].append(user_id)
            changed["linked_sessions"] = sorted(self.orphan_sessions)
            self.orphan_sessions.clear()

            known = set(self.truth.values())
            pool = [p for p in self.people if p.person_id not in known]
            for person in rng.sample(pool, min(n_new, len(pool))):
                updated_at = _between(rng, start, now)
                user_id = self._add_contact(person, rng, updated_at, updated_at)
                changed["new_contacts"].append(user_id)
                for _ in range(rng.randint(1, 2)):
                    changed["new_sessions"].append(self._add_session(user_id, rng, _between(rng, start, now)))
        return changed

    def page(self, kind: str, *, modified_from: datetime | None, modified_to: datetime | None,
             page: int, page_size: int, status: str | None = None) -> tuple[list[dict], int]:
        """Page `page` (from 1) of `kind` in (updated_at, id) order, and the total matching the filters."""
        with self.lock:
            view = self.view(kind, "updated_at", ID_FIELD[kind], group_field="status")
            _, records, lo, hi = view.slice(self.contacts if kind == "contacts" else self.sessions,
                                            lower=modified_from, upper=modified_to, group=status)
            start = lo + (page - 1) * page_size
            return [dict(r) for r in records[start:min(start + page_size, hi)]], hi - lo


def create_app(store: ImStore, api_key: str, faults: Faults | None = None):
    """The FastAPI app; `app.state.faults` and `app.state.stats` are the live settings and counters."""
    if not api_key:
        raise ValueError("the IM simulator needs a non-empty API key")
    app = new_app("enterprise IM simulator", faults)

    def error(status: int, errmsg: str, headers: dict | None = None) -> JSONResponse:
        errcode = _ERRCODES.get(status, ERR_BUSY)
        return JSONResponse({"errcode": errcode, "errmsg": errmsg}, status_code=status, headers=headers)

    def unauthorised() -> JSONResponse:
        return error(401, "invalid api key")

    def authorised(request: Request) -> bool:
        return hmac.compare_digest(request.headers.get("x-api-key", "").strip().encode(), api_key.encode())

    async def serve(kind: str, request: Request) -> JSONResponse:
        response = await answer(kind, request)
        app.state.stats.record(ENDPOINTS[kind], response.status_code)
        return response

    async def answer(kind: str, request: Request) -> JSONResponse:
        if not authorised(request):
            return unauthorised()
        fault = await misbehave(app, error, _FAULT_MESSAGES)
        if fault is not None:
            return fault
        q = request.query_params
        try:
            modified_from = _parse_ts(q["modified_from"]) if q.get("modified_from") else None
            modified_to = _parse_ts(q["modified_to"]) if q.get("modified_to") else None
            page = int(q.get("page", 1))
            page_size = int(q.get("page_size", DEFAULT_PAGE_SIZE))
        except (ValueError, TypeError) as exc:
            return error(400, f"invalid parameter: {exc}")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            return error(400, f"page_size must be between 1 and {MAX_PAGE_SIZE}, got {page_size}")
        if page < 1:
            return error(400, f"page starts at 1, got {page}")
        status = q.get("status") if kind == "sessions" else None
        if status is not None and status not in SESSION_STATUSES:
            return error(400, f"status must be one of {list(SESSION_STATUSES)}, got {status!r}")
        items, total = store.page(kind, modified_from=modified_from, modified_to=modified_to,
                                  page=page, page_size=page_size, status=status)
        return JSONResponse({"errcode": ERR_OK, "errmsg": "ok", "result": {
            "items": items, "page": page, "page_size": page_size, "total": total,
            "total_pages": math.ceil(total / page_size),
        }})

    @app.get(ENDPOINTS["contacts"])
    async def contacts(request: Request):
        return await serve("contacts", request)

    @app.get(ENDPOINTS["sessions"])
    async def sessions(request: Request):
        return await serve("sessions", request)

    install_admin(app, authorised, error, unauthorised)
    return app


class ImServer(ApiServer):
    """The IM simulator on a background uvicorn thread; use as a context manager or start()/stop()."""

    name = "IM"

    def __init__(self, store: ImStore, api_key: str, faults: Faults | None = None, host: str = "127.0.0.1",
                 port: int = 0):
        super().__init__(create_app(store, api_key, faults), host=host, port=port)
        self.store = store
        self.api_key = api_key


def main(argv: Sequence[str] | None = None) -> None:
    def build(args, world, faults):
        store = ImStore.generate(*world)
        return create_app(store, args.api_key, faults), (
            f"IM simulator: {len(store.contacts)} contacts, {len(store.sessions)} sessions "
            f"({len(store.orphan_sessions)} orphaned) on http://{args.host}:{args.port}")

    run_standalone(argv, "Run the enterprise IM simulator on loopback.", 8766,
                   [("--api-key", "IM_API_KEY", "key clients must send as X-Api-Key")], build)


if __name__ == "__main__":
    main()
