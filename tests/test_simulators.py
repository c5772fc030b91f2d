"""The sample source systems behave like the messy real ones the pipeline is built for."""
from __future__ import annotations

import math
import pickle
import random
import re
import secrets
import smtplib
from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest
import requests

from crm_sync.simulators import erp
from crm_sync.simulators.people import generate_people, render_email, render_name, render_phone, to_traditional
from crm_sync.simulators.smtp_outbox import OutboxServer
from crm_sync.simulators.ticketing import TicketingServer, TicketingStore

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
PEOPLE = generate_people(400, 7)
PEOPLE_BY_ID = {p.person_id: p for p in PEOPLE}

PHONE_FORMATS = {
    "plain": r"1\d{10}",
    "intl_spaced": r"\+86 1\d{2} \d{4} \d{4}",
    "intl_00": r"0086-1\d{10}",
    "intl_bare": r"86 1\d{10}",
    "dashed": r"1\d{2}-\d{4}-\d{4}",
    "intl_paren": r"\(\+86\)1\d{10}",
    "fullwidth": r"[０-９ ]+",
    "landline": r"0\d{2,3}-\d{8}",
    "landline_zhuan": r"0\d{2,3}-\d{8}转\d+",
    "landline_ext": r"\(0\d{2,3}\)\d{8}( ext \d+)?",
}


def phone_format(value: str) -> str:
    for name, pattern in PHONE_FORMATS.items():
        if re.fullmatch(pattern, value):
            return name
    return "invalid" if len(re.sub(r"\D", "", value)) < 9 else "other"


# --- people -------------------------------------------------------------------------------------

def test_people_are_deterministic_and_collide_like_real_ones():
    assert generate_people(400, 7) == PEOPLE
    assert generate_people(400, 8) != PEOPLE

    assert len({p.person_id for p in PEOPLE}) == len(PEOPLE)
    assert len({p.mobile for p in PEOPLE}) == len(PEOPLE)
    assert all(re.fullmatch(r"1\d{10}", p.mobile) for p in PEOPLE)

    surnames = Counter(p.surname for p in PEOPLE)
    assert sum(n for s, n in surnames.items() if s in "王李张刘陈") > 0.35 * len(PEOPLE)
    shared_names = [name for name, n in Counter(p.name for p in PEOPLE).items() if n >= 2]
    assert len(shared_names) >= 10, "different people must share common full names"

    by_landline: dict[str, list] = {}
    for p in PEOPLE:
        if p.landline:
            by_landline.setdefault(p.landline, []).append(p)
    switchboards = [group for group in by_landline.values() if len(group) >= 2]
    assert switchboards, "colleagues must share a company switchboard"
    for group in switchboards:
        extensions = [p.extension for p in group]
        assert None not in extensions and len(set(extensions)) == len(extensions)

    shared_mail = [e for e, n in Counter(p.email for p in PEOPLE).items() if n >= 2]
    assert shared_mail and all(e.startswith("info@") for e in shared_mail)


def test_renderings_cover_every_variant():
    rng = random.Random(1)
    assert to_traditional("张伟") == "張偉"
    names = [(p, render_name(p, rng)) for p in PEOPLE for _ in range(3)]
    assert any(r.endswith(("先生", "女士", "总")) for _, r in names)
    assert any(r != p.name and r == to_traditional(p.name) for p, r in names)
    assert any(re.fullmatch(r"[A-Za-z]+( [A-Za-z]+)?", r) for _, r in names)
    assert any(" " in r.strip() and r.replace(" ", "") == p.name for p, r in names)

    mobiles = [render_phone(p.mobile, rng) for p in PEOPLE for _ in range(3)]
    formats = Counter(phone_format(m) if m is not None else "missing" for m in mobiles)
    for expected in ("plain", "intl_spaced", "intl_00", "intl_bare", "dashed", "intl_paren", "fullwidth",
                     "missing", "invalid"):
        assert formats[expected] > 0, f"no {expected} mobile among {formats}"
    assert formats["other"] == 0, [m for m in mobiles if m and phone_format(m) == "other"]

    landlines = [render_phone(p.landline, rng, extension=p.extension) for p in PEOPLE if p.landline for _ in range(3)]
    assert any(x and "转" in x for x in landlines)
    assert any(x and " ext " in x for x in landlines)
    assert any(x and re.fullmatch(r"0\d{2,3}-\d{8}", x) for x in landlines)

    emails = [render_email(p.email, rng) for p in PEOPLE]
    assert None in emails
    assert any(e and e != e.strip() for e in emails)
    assert any(e and e != e.lower() for e in emails)
    assert all(e is None or e.strip().lower() == p.email for e, p in zip(emails, PEOPLE))


# --- ERP ----------------------------------------------------------------------------------------

def _snapshot(conn) -> dict[str, list[tuple]]:
    with conn.cursor() as cur:
        out = {}
        for table, key in (("customers", "customer_no"), ("orders", "order_no"), ("truth", "customer_no")):
            cur.execute(f"select * from src_erp.{table} order by {key}")
            out[table] = cur.fetchall()
        return out


def test_erp_seed_is_deterministic(conn):
    first = erp.seed(conn, people=PEOPLE, seed=5, now=NOW)
    snap = _snapshot(conn)
    again = erp.seed(conn, people=PEOPLE, seed=5, now=NOW)
    assert again == first and _snapshot(conn) == snap
    assert len(snap["customers"]) == first.customers and len(snap["orders"]) == first.orders
    erp.seed(conn, people=PEOPLE, seed=6, now=NOW)
    assert _snapshot(conn) != snap


def test_erp_has_duplicates_truth_and_messy_values(conn):
    result = erp.seed(conn, people=PEOPLE, seed=42, now=NOW)
    with conn.cursor() as cur:
        cur.execute("""select c.customer_no, c.name, c.mobile, c.phone, c.email, t.person_id, c.created_at, c.updated_at
                       from src_erp.customers c left join src_erp.truth t using (customer_no)""")
        rows = cur.fetchall()
    assert all(r[5] is not None for r in rows), "every customer has a truth row"
    per_person = Counter(r[5] for r in rows)
    assert 0.6 * len(PEOPLE) <= len(per_person) <= 0.8 * len(PEOPLE)
    twice = [pid for pid, n in per_person.items() if n == 2]
    assert len(twice) == result.duplicate_people == round(0.05 * len(PEOPLE))
    assert max(per_person.values()) == 2

    names = [(PEOPLE_BY_ID[r[5]], r[1]) for r in rows]
    assert sum(n.endswith(("先生", "女士")) for _, n in names) >= 3
    assert sum(n != p.name and n == to_traditional(p.name) for p, n in names) >= 3
    assert sum(bool(re.fullmatch(r"[A-Za-z ]+", n)) for _, n in names) >= 3

    formats = Counter(phone_format(r[2]) for r in rows if r[2])
    assert len([f for f in formats if f not in ("invalid", "other")]) >= 6, formats
    assert any(r[2] is None for r in rows) and formats["invalid"] > 0
    assert any(r[3] and "转" in r[3] for r in rows)
    assert any(r[4] and r[4] != r[4].strip() for r in rows)

    assert all(NOW - timedelta(days=30) <= r[7] < NOW and r[6] <= r[7] for r in rows)


def test_erp_amounts_are_exact_decimals(conn):
    erp.seed(conn, people=PEOPLE, seed=42, now=NOW)
    with conn.cursor() as cur:
        cur.execute("select customer_no, amount, currency, updated_at from src_erp.orders")
        orders = cur.fetchall()
        cur.execute("select sum(amount)::text from src_erp.orders")
        db_total = Decimal(cur.fetchone()[0])
    amounts = [o[1] for o in orders]
    assert all(isinstance(a, Decimal) and a.as_tuple().exponent == -2 and a > 0 for a in amounts)
    assert sum(amounts) == db_total
    per_customer = Counter(o[0] for o in orders)
    assert set(per_customer.values()) == {1, 2, 3, 4}
    currencies = Counter(o[2] for o in orders)
    assert currencies["CNY"] > 0.8 * len(orders) and len(currencies) > 1
    assert all(NOW - timedelta(days=30) <= o[3] < NOW for o in orders)


def test_erp_incremental_day_is_visible_in_the_last_hour(conn):
    erp.seed(conn, people=PEOPLE, seed=42, now=NOW)
    with conn.cursor() as cur:
        cur.execute("select person_id from src_erp.truth")
        known_before = {r[0] for r in cur.fetchall()}
    later = NOW + timedelta(days=1)
    changes = erp.apply_changes(conn, seed=42, now=later, n_updates=10, n_new=5, people=PEOPLE)
    assert len(changes.updated_customers) == 10 and len(changes.new_customers) == 5
    with conn.cursor() as cur:
        cur.execute("select customer_no, updated_at from src_erp.customers where updated_at >= %s", (later - timedelta(hours=1),))
        recent = cur.fetchall()
        cur.execute("select order_no from src_erp.orders where updated_at >= %s", (later - timedelta(hours=1),))
        recent_orders = {r[0] for r in cur.fetchall()}
        cur.execute("select person_id from src_erp.truth where customer_no = any(%s)", (changes.new_customers,))
        new_people = {r[0] for r in cur.fetchall()}
    assert {r[0] for r in recent} == set(changes.updated_customers) | set(changes.new_customers)
    assert all(r[1] < later for r in recent)
    assert recent_orders == set(changes.updated_orders) | set(changes.new_orders)
    assert len(new_people) == 5 and not new_people & known_before and new_people <= set(PEOPLE_BY_ID)


def test_erp_bad_batch_breaks_more_than_ten_percent(conn):
    erp.seed(conn, people=PEOPLE, seed=42, now=NOW)
    batch = erp.inject_bad_batch(conn, now=NOW)
    email_ok = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
    with conn.cursor() as cur:
        cur.execute("select email, updated_at from src_erp.customers where customer_no = any(%s)", (batch.customers,))
        customers = cur.fetchall()
        cur.execute("select amount, currency, order_date, updated_at from src_erp.orders where order_no = any(%s)",
                    (batch.orders,))
        orders = cur.fetchall()
    bad_customers = [c for c in customers if c[0] is not None and not email_ok.fullmatch(c[0].strip())]
    bad_orders = [o for o in orders if o[0] < 0 or o[1] == "XXX" or o[2] is None]
    assert len(bad_customers) == batch.bad_customers and len(bad_customers) > 0.1 * len(customers)
    assert len(bad_orders) == batch.bad_orders and len(bad_orders) > 0.1 * len(orders)
    assert {o[1] for o in bad_orders} >= {"XXX"} and any(o[0] < 0 for o in bad_orders)
    assert all(NOW - timedelta(hours=1) <= row[-1] < NOW for row in customers + orders)
    with conn.cursor() as cur:  # the ERP is read in full: the whole table must fail too, not just the batch
        cur.execute("select count(*), count(*) filter (where email in ('not-an-email', 'zhang.wei@', '@example', "
                    "'li na@163', 'wang@@qq.com')) from src_erp.customers")
        total, bad = cur.fetchone()
        cur.execute("select count(*), count(*) filter (where amount < 0 or currency = 'XXX' or order_date is null) "
                    "from src_erp.orders")
        total_orders, bad_in_orders = cur.fetchone()
    assert bad == batch.bad_customers and bad > 0.1 * total
    assert bad_in_orders == batch.bad_orders and bad_in_orders > 0.1 * total_orders


def test_erp_volume_drop_and_schema_drift(conn):
    import psycopg2

    from crm_sync.config import load_source

    seeded = erp.seed(conn, people=PEOPLE, seed=42, now=NOW)
    dropped = erp.drop_volume(conn, 0.9)
    with conn.cursor() as cur:
        cur.execute("select count(*) from src_erp.customers")
        left = cur.fetchone()[0]
        cur.execute("select count(*) from src_erp.orders o left join src_erp.customers c using (customer_no) "
                    "where c.customer_no is null")
        orphans = cur.fetchone()[0]
    assert dropped["customers"] == seeded.customers - left == math.floor(seeded.customers * 0.9)
    assert orphans == 0 and dropped["orders"] > 0.85 * seeded.orders

    query = load_source("erp").streams[0].query
    erp.add_column_drift(conn)
    with conn.cursor() as cur, pytest.raises(psycopg2.errors.UndefinedColumn, match="mobile"):
        cur.execute(query, {"since": None, "until": NOW})
    conn.rollback()


# --- ticketing ----------------------------------------------------------------------------------

TICKET_PEOPLE = generate_people(150, 11)


@pytest.fixture(scope="module")
def desk():
    token = secrets.token_urlsafe(16)
    store = TicketingStore.generate(TICKET_PEOPLE, seed=11, now=NOW)
    with TicketingServer(store, token) as server:
        server.token = token
        yield server


@pytest.fixture()
def api(desk):
    desk.reset()
    yield desk
    desk.reset()


def _get(server, path, token="default", **params):
    token = server.token if token == "default" else token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(server.base_url + path, params=params, headers=headers, timeout=5)


def _all_pages(server, path, **params) -> list[list[dict]]:
    pages = []
    while True:
        response = _get(server, path, **params)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["data"])
        if not body["next_cursor"]:
            return pages
        params["cursor"] = body["next_cursor"]


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_ticketing_store_is_deterministic_and_overlaps_erp(conn):
    store = TicketingStore.generate(TICKET_PEOPLE, seed=11, now=NOW)
    again = TicketingStore.generate(TICKET_PEOPLE, seed=11, now=NOW)
    assert store.users == again.users and store.tickets == again.tickets and store.truth == again.truth
    revived = pickle.loads(pickle.dumps(store))  # the demo keeps the desk between runs this way
    assert revived.users == store.users and revived.truth == store.truth
    assert set(store.truth) == {u["id"] for u in store.users}
    assert 0.35 * len(TICKET_PEOPLE) < len(set(store.truth.values())) < 0.65 * len(TICKET_PEOPLE)
    assert {t["requester_id"] for t in store.tickets} <= set(store.truth)
    assert {t["status"] for t in store.tickets} <= {"new", "open", "pending", "hold", "solved", "closed"}
    stamps = [u["updated_at"] for u in store.users]
    assert any(s.endswith("Z") for s in stamps) and any(s.endswith("+00:00") for s in stamps)
    assert all(_ts(r["updated_at"]) < NOW for r in store.users + store.tickets)

    erp.seed(conn, people=TICKET_PEOPLE, seed=11, now=NOW)
    with conn.cursor() as cur:
        cur.execute("select person_id from src_erp.truth")
        in_erp = {r[0] for r in cur.fetchall()}
    assert len(in_erp & set(store.truth.values())) > 0.2 * len(TICKET_PEOPLE)

    later = NOW + timedelta(hours=3)
    changed = store.apply_changes(seed=11, now=later, n_updates=5, n_new=3)
    recent = {u["id"] for u in store.users if later - timedelta(hours=1) <= _ts(u["updated_at"]) < later}
    assert recent == set(changed["updated_users"]) | set(changed["new_users"]) and len(changed["new_users"]) == 3


def test_ticketing_requires_the_bearer_token(api):
    missing = _get(api, "/api/v2/users", token=None)
    wrong = _get(api, "/api/v2/users", token="not-the-token")
    assert missing.status_code == wrong.status_code == 401
    assert "token" in missing.json()["error"]
    assert _get(api, "/api/v2/users").status_code == 200
    assert requests.get(api.base_url + "/_admin/stats", timeout=5).status_code == 401


def test_ticketing_pagination_returns_every_record_once(api):
    for path, records in (("/api/v2/users", api.store.users), ("/api/v2/tickets", api.store.tickets)):
        pages = _all_pages(api, path, limit=7)
        assert len(pages) == math.ceil(len(records) / 7)
        assert all(len(page) == 7 for page in pages[:-1])
        seen = [r["id"] for page in pages for r in page]
        assert sorted(seen) == sorted(r["id"] for r in records)
        keys = [(_ts(r["updated_at"]), r["id"]) for page in pages for r in page]
        assert keys == sorted(keys)


def test_ticketing_window_is_since_inclusive_before_exclusive(api):
    ordered = sorted(api.store.users, key=lambda u: (_ts(u["updated_at"]), u["id"]))
    since, before = _ts(ordered[10]["updated_at"]), _ts(ordered[40]["updated_at"])
    pages = _all_pages(api, "/api/v2/users", limit=9, updated_since=since.isoformat(),
                       updated_before=before.isoformat())
    got = {r["id"] for page in pages for r in page}
    expected = {u["id"] for u in ordered if since <= _ts(u["updated_at"]) < before}
    assert got == expected
    assert ordered[10]["id"] in got and ordered[40]["id"] not in got
    assert _get(api, "/api/v2/users", limit=1001).status_code == 400
    assert _get(api, "/api/v2/users", updated_since="yesterday").status_code == 400


def test_ticketing_rate_limit_answers_429_with_retry_after(api):
    api.set_faults(rate_limit_every=2, retry_after_seconds=3)
    first, second, third = (_get(api, "/api/v2/users", limit=5) for _ in range(3))
    assert (first.status_code, second.status_code, third.status_code) == (200, 429, 200)
    assert second.headers["Retry-After"] == "3"
    assert "rate limit" in second.json()["error"]


def test_fetch_pages_gets_everything_through_rate_limits(api):
    from crm_sync.config import HttpOptions
    from crm_sync.sources.http_source import CallStats, fetch_pages

    api.set_faults(rate_limit_every=3)
    waits: list[float] = []
    stats = CallStats()
    with requests.Session() as session:
        pages = list(fetch_pages(session, api.base_url, "/api/v2/users", options=HttpOptions(page_size=20),
                                 login=None, password=api.token, source="ticketing", stream="users",
                                 since=None, until=NOW, stats=stats, sleep=waits.append))
    assert sorted(r["id"] for page in pages for r in page) == sorted(u["id"] for u in api.store.users)
    server_counts = api.stats()["by_endpoint"]["/api/v2/users"]
    assert stats.by_status == server_counts and server_counts["429"] == len(waits) > 0
    assert set(waits) == {1.0}


def test_ticketing_outage_and_admin_faults(api):
    headers = {"Authorization": f"Bearer {api.token}"}
    assert requests.post(api.base_url + "/_admin/faults", json={"outage": True}, timeout=5).status_code == 401
    answer = requests.post(api.base_url + "/_admin/faults", json={"outage": True}, headers=headers, timeout=5)
    assert answer.status_code == 200 and answer.json()["outage"] is True
    assert _get(api, "/api/v2/users").status_code == 503
    assert _get(api, "/api/v2/tickets").status_code == 503
    unknown = requests.post(api.base_url + "/_admin/faults", json={"explode": 1}, headers=headers, timeout=5)
    assert unknown.status_code == 400 and "explode" in unknown.json()["error"]
    requests.post(api.base_url + "/_admin/faults", json={"outage": False}, headers=headers, timeout=5)
    assert _get(api, "/api/v2/users").status_code == 200


def test_ticketing_error_rate_is_seeded_and_timeouts_hang(api):
    def statuses():
        api.reset()
        api.set_faults(error_rate=0.4, seed=3)
        return [_get(api, "/api/v2/tickets", limit=1).status_code for _ in range(25)]

    first = statuses()
    assert first == statuses()
    assert {200, 500, 503} <= set(first)

    api.reset()
    api.set_faults(timeout_every=2, hang_seconds=1.0)
    assert _get(api, "/api/v2/users", limit=1).status_code == 200
    with pytest.raises(requests.Timeout):
        requests.get(api.base_url + "/api/v2/users", headers={"Authorization": f"Bearer {api.token}"}, timeout=0.3)


def test_ticketing_admin_stats_count_calls(api):
    for _ in range(3):
        _get(api, "/api/v2/users", limit=2)
    _get(api, "/api/v2/users", token=None)
    _get(api, "/api/v2/tickets", limit=2)
    api.set_faults(outage=True)
    _get(api, "/api/v2/tickets")
    response = requests.get(api.base_url + "/_admin/stats", headers={"Authorization": f"Bearer {api.token}"}, timeout=5)
    assert response.json() == {
        "calls": 6,
        "by_endpoint": {"/api/v2/users": {"200": 3, "401": 1}, "/api/v2/tickets": {"200": 1, "503": 1}},
    }


# --- SMTP outbox --------------------------------------------------------------------------------

def test_smtp_outbox_stores_messages_exactly_as_received(tmp_path):
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = "crm-sync@localhost"
    message["To"] = "oncall-data@example.com"
    message["Subject"] = "数据质量告警: erp 批次失败 (3/40 rows)"
    message.set_content("The batch failed.\n.a line that starts with a dot\n")
    raw = message.as_bytes()
    assert b"\r\n" in raw and raw.endswith(b"\r\n")

    with OutboxServer(tmp_path / "outbox") as outbox:
        with smtplib.SMTP(outbox.host, outbox.port, timeout=5) as client:
            client.sendmail("crm-sync@localhost", ["oncall-data@example.com"], raw)
            client.sendmail("crm-sync@localhost", ["oncall-data@example.com"], raw.replace(b"failed", b"recovered"))
        files = outbox.messages()

    assert len(files) == 2 and all(re.fullmatch(r"\d{8}T\d{12}Z-\d{6}\.eml", f.name) for f in files)
    assert files[0].read_bytes() == raw
    assert b"recovered" in files[1].read_bytes()
    parsed = message_from_bytes(files[0].read_bytes(), policy=policy.default)
    assert parsed["Subject"] == "数据质量告警: erp 批次失败 (3/40 rows)"
    assert not list((tmp_path / "outbox").glob("*.part"))
