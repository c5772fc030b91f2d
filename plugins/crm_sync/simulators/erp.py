"""The legacy ERP as a PostgreSQL schema `src_erp`: customers, orders, and the hidden truth.

Guarantees:
- `seed(conn, people=..., seed=..., now=...)` replaces the schema and writes exactly the same rows
  for the same people, seed and `now`: about 70% of the people become customers, about 5% of the
  people twice under two customer numbers (the in-source duplicates a clerk creates), each with
  1-4 orders whose amounts are exact two-decimal `Decimal`s. Every `updated_at` lies in the 30
  days before `now`, never at or after it. `src_erp.truth` maps every customer_no to its true
  person_id so that tests can score identity resolution; the pipeline never reads it.
- `apply_changes` is one more business day: some customers and orders change, some are new, all
  with `updated_at` in the hour before `now`, so an incremental run has something to pick up.
- `inject_bad_batch`, `drop_volume` and `add_column_drift` break the source on purpose for the
  'bad-batch', 'volume-drop' and 'schema-drift' demo scenarios.
- `ensure_reader` makes the login an integration gets from the ERP team: it reads `customers`
  and `orders` (not `truth`), and every session of it is read-only.
- Every function commits its own transaction; rows are written in bulk, not one by one.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Sequence

from crm_sync.simulators.people import Person, generate_people, render_email, render_name, render_phone

SCHEMA = "src_erp"

_DDL = """
drop schema if exists src_erp cascade;
create schema src_erp;
create table src_erp.customers (
    customer_no text primary key,
    name text, mobile text, phone text, email text, company text, city text,
    created_at timestamptz, updated_at timestamptz
);
create table src_erp.orders (
    order_no text primary key,
    customer_no text,
    order_date date,
    amount numeric(18,2),
    currency text,
    status text,
    updated_at timestamptz
);
create table src_erp.truth (
    customer_no text primary key,
    person_id text not null
);
create index on src_erp.customers (updated_at, customer_no);
create index on src_erp.orders (updated_at, order_no);
"""

_CURRENCIES = (("CNY", 90), ("USD", 5), ("HKD", 3), ("EUR", 2))
_STATUSES = (("completed", 45), ("shipped", 20), ("paid", 15), ("open", 10), ("cancelled", 6), ("refunded", 4))
_NEXT_STATUS = {"open": "paid", "paid": "shipped", "shipped": "completed", "completed": "refunded"}

# what an integration may read: the hidden truth is the tests' answer key, not ERP data
READABLE_TABLES = ("customers", "orders")

_CUSTOMER_COLUMNS = ("customer_no", "name", "mobile", "phone", "email", "company", "city", "created_at", "updated_at")
_ORDER_COLUMNS = ("order_no", "customer_no", "order_date", "amount", "currency", "status", "updated_at")


@dataclass(frozen=True)
class SeedResult:
    customers: int
    orders: int
    people_in_source: int
    duplicate_people: int  # people written twice under different customer numbers


@dataclass(frozen=True)
class ChangeResult:
    updated_customers: list[str] = field(default_factory=list)
    new_customers: list[str] = field(default_factory=list)
    updated_orders: list[str] = field(default_factory=list)
    new_orders: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BadBatchResult:
    customers: list[str]
    orders: list[str]
    bad_customers: int
    bad_orders: int


def _insert(cur, table: str, columns: Sequence[str], rows: list[tuple]) -> None:
    from psycopg2.extras import execute_values

    if rows:
        execute_values(cur, f"insert into {SCHEMA}.{table} ({', '.join(columns)}) values %s", rows, page_size=1000)


def _customer_row(person: Person, customer_no: str, rng: random.Random, created_at: datetime,
                  updated_at: datetime) -> tuple:
    return (
        customer_no,
        render_name(person, rng),
        render_phone(person.mobile, rng),
        render_phone(person.landline, rng, extension=person.extension),
        render_email(person.email, rng),
        person.company if rng.random() < 0.9 else person.company.replace("有限公司", ""),
        person.city if rng.random() < 0.95 else None,
        created_at,
        updated_at,
    )


def _amount(rng: random.Random) -> Decimal:
    # Built from integer cents: a float never touches money.
    return Decimal(rng.randint(1_000, 5_000_000)).scaleb(-2)


def _order_row(order_no: str, customer_no: str, rng: random.Random, order_date: date, updated_at: datetime) -> tuple:
    currency = rng.choices([c for c, _ in _CURRENCIES], [w for _, w in _CURRENCIES])[0]
    status = rng.choices([s for s, _ in _STATUSES], [w for _, w in _STATUSES])[0]
    return (order_no, customer_no, order_date, _amount(rng), currency, status, updated_at)


def _recent(rng: random.Random, now: datetime, max_seconds: int) -> datetime:
    # Whole seconds and at least one second back: strictly before `now`, whatever the reader's rounding.
    return now - timedelta(seconds=rng.randint(1, max_seconds))


def seed(conn, *, people: Sequence[Person], seed: int = 42, now: datetime) -> SeedResult:
    """Recreate `src_erp` with customers and orders rendered from `people`; commits."""
    rng = random.Random(f"erp:{seed}")
    in_erp = [p for p in people if rng.random() < 0.70]
    twice = rng.sample(in_erp, min(len(in_erp), round(0.05 * len(people))))
    entries = [(p, rng.random()) for p in in_erp] + [(p, rng.random()) for p in twice]
    rng.shuffle(entries)  # customer numbers must not reveal which records belong together

    customers, truth, orders = [], [], []
    order_seq = 0
    for i, (person, _) in enumerate(entries):
        customer_no = f"C{100_001 + i}"
        updated_at = _recent(rng, now, 30 * 86_400)
        created_at = min(updated_at, now - timedelta(days=rng.randint(30, 3 * 365), seconds=rng.randint(0, 86_399)))
        customers.append(_customer_row(person, customer_no, rng, created_at, updated_at))
        truth.append((customer_no, person.person_id))
        for _ in range(rng.randint(1, 4)):
            order_seq += 1
            order_date = (now - timedelta(days=rng.randint(0, 730))).date()
            orders.append(_order_row(f"SO{order_seq:07d}", customer_no, rng, order_date,
                                     _recent(rng, now, 30 * 86_400)))
    with conn.cursor() as cur:
        cur.execute(_DDL)
        _insert(cur, "customers", _CUSTOMER_COLUMNS, customers)
        _insert(cur, "orders", _ORDER_COLUMNS, orders)
        _insert(cur, "truth", ("customer_no", "person_id"), truth)
    conn.commit()
    return SeedResult(customers=len(customers), orders=len(orders), people_in_source=len(in_erp),
                      duplicate_people=len(twice))


def _next_number(cur, sql: str, default: int) -> int:
    cur.execute(sql)
    value = cur.fetchone()[0]
    return (value or default - 1) + 1


def apply_changes(conn, *, seed: int, now: datetime, n_updates: int = 50, n_new: int = 20,
                  people: Sequence[Person] | None = None) -> ChangeResult:
    """One incremental day: update `n_updates` customers and as many orders, add `n_new` customers.

    New customers are people of `people` the ERP does not know yet (so they may match a ticketing
    user), or brand-new persons when no pool is given. Commits.
    """
    rng = random.Random(f"erp-changes:{seed}:{now.isoformat()}")
    result = ChangeResult()
    with conn.cursor() as cur:
        cur.execute(f"select customer_no, mobile, email, city from {SCHEMA}.customers order by customer_no")
        existing = cur.fetchall()
        cur.execute(f"select order_no, status from {SCHEMA}.orders order by order_no")
        existing_orders = cur.fetchall()
        cur.execute(f"select distinct person_id from {SCHEMA}.truth")
        known = {row[0] for row in cur.fetchall()}

        updates = []
        for customer_no, mobile, email, city in rng.sample(existing, min(n_updates, len(existing))):
            change = rng.random()
            if change < 0.4:
                city = rng.choice(("北京", "上海", "深圳", "杭州", "成都"))
            elif change < 0.7 and email:
                email = email.strip().lower()
            elif mobile:
                mobile = mobile.replace(" ", "").replace("-", "")
            updates.append((customer_no, mobile, email, city, _recent(rng, now, 3_600)))
            result.updated_customers.append(customer_no)
        if updates:
            from psycopg2.extras import execute_values

            execute_values(cur, f"""
                update {SCHEMA}.customers c
                set mobile = v.mobile, email = v.email, city = v.city, updated_at = v.updated_at::timestamptz
                from (values %s) as v(customer_no, mobile, email, city, updated_at)
                where c.customer_no = v.customer_no""", updates)
            order_updates = []
            for order_no, status in rng.sample(existing_orders, min(n_updates, len(existing_orders))):
                order_updates.append((order_no, _NEXT_STATUS.get(status, status), _recent(rng, now, 3_600)))
                result.updated_orders.append(order_no)
            execute_values(cur, f"""
                update {SCHEMA}.orders o set status = v.status, updated_at = v.updated_at::timestamptz
                from (values %s) as v(order_no, status, updated_at)
                where o.order_no = v.order_no""", order_updates)

        pool = [p for p in (people or []) if p.person_id not in known]
        if len(pool) < n_new:
            pool += generate_people(n_new - len(pool), rng.randint(0, 2**31), id_prefix=f"p-erp{seed}-{now:%Y%m%d%H%M}")
        next_customer = _next_number(cur, f"select max(substr(customer_no, 2)::int) from {SCHEMA}.customers "
                                          "where customer_no ~ '^C[0-9]+$'", 100_001)
        next_order = _next_number(cur, f"select max(substr(order_no, 3)::int) from {SCHEMA}.orders "
                                       "where order_no ~ '^SO[0-9]+$'", 1)
        customers, orders, truth = [], [], []
        for i, person in enumerate(rng.sample(pool, n_new)):
            customer_no = f"C{next_customer + i}"
            updated_at = _recent(rng, now, 3_600)
            customers.append(_customer_row(person, customer_no, rng, updated_at, updated_at))
            truth.append((customer_no, person.person_id))
            result.new_customers.append(customer_no)
            for _ in range(rng.randint(1, 2)):
                order_no = f"SO{next_order:07d}"
                next_order += 1
                orders.append(_order_row(order_no, customer_no, rng, now.date() - timedelta(days=1),
                                         _recent(rng, now, 3_600)))
                result.new_orders.append(order_no)
        _insert(cur, "customers", _CUSTOMER_COLUMNS, customers)
        _insert(cur, "orders", _ORDER_COLUMNS, orders)
        _insert(cur, "truth", ("customer_no", "person_id"), truth)
    conn.commit()
    return result


def inject_bad_batch(conn, *, now: datetime, seed: int = 0, n_customers: int | None = None,
                     n_orders: int | None = None) -> BadBatchResult:
    """Insert a batch where two thirds of the customers and of the orders break the quality suites; commits.

    Bad customers carry unparsable emails; bad orders have a negative amount, the unknown
    currency 'XXX' or no order date. The batch defaults to 30% of the rows already there, so even
    a full-refresh read of the whole table sees more than 10% bad rows and the suite fails as a
    whole instead of quarantining a few.
    """
    rng = random.Random(f"erp-bad:{seed}:{now.isoformat()}")
    bad_emails = ("not-an-email", "zhang.wei@", "@example", "li na@163", "wang@@qq.com")
    with conn.cursor() as cur:
        cur.execute(f"select (select count(*) from {SCHEMA}.customers), (select count(*) from {SCHEMA}.orders)")
        existing_customers, existing_orders = cur.fetchone()
        n_customers = n_customers or max(20, math.ceil(0.3 * existing_customers))
        n_orders = n_orders or max(40, math.ceil(0.3 * existing_orders))
        persons = generate_people(n_customers, rng.randint(0, 2**31), id_prefix=f"p-bad{seed}")
        next_customer = _next_number(cur, f"select max(substr(customer_no, 2)::int) from {SCHEMA}.customers "
                                          "where customer_no ~ '^C[0-9]+$'", 100_001)
        next_order = _next_number(cur, f"select max(substr(order_no, 3)::int) from {SCHEMA}.orders "
                                       "where order_no ~ '^SO[0-9]+$'", 1)
        customers, truth = [], []
        for i, person in enumerate(persons):
            customer_no = f"C{next_customer + i}"
            updated_at = _recent(rng, now, 1_800)
            row = list(_customer_row(person, customer_no, rng, updated_at, updated_at))
            row[4] = bad_emails[i % len(bad_emails)] if i % 3 else person.email
            customers.append(tuple(row))
            truth.append((customer_no, person.person_id))
        orders = []
        for i in range(n_orders):
            order_no = f"SO{next_order + i:07d}"
            row = list(_order_row(order_no, customers[i % len(customers)][0], rng, now.date() - timedelta(days=1),
                                  _recent(rng, now, 1_800)))
            defect = i % 6
            if defect in (1, 4):
                row[3] = -row[3]
            elif defect == 2:
                row[4] = "XXX"
            elif defect == 5:
                row[2] = None
            orders.append(tuple(row))
        _insert(cur, "customers", _CUSTOMER_COLUMNS, customers)
        _insert(cur, "orders", _ORDER_COLUMNS, orders)
        _insert(cur, "truth", ("customer_no", "person_id"), truth)
    conn.commit()
    return BadBatchResult(
        customers=[c[0] for c in customers], orders=[o[0] for o in orders],
        bad_customers=sum(1 for c in customers if c[4] in bad_emails),
        bad_orders=sum(1 for o in orders if o[2] is None or o[3] < 0 or o[4] == "XXX"),
    )


def drop_volume(conn, fraction: float = 0.9) -> dict[str, int]:
    """Delete `fraction` of customers (with their orders and truth) and of the other orders; commits.

    Which rows go is decided by a hash of the key, so the same rows go every time.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    with conn.cursor() as cur:
        cur.execute(f"""
            create temp table doomed on commit drop as
            select customer_no from {SCHEMA}.customers
            order by md5(customer_no)
            limit (select floor(count(*) * %(f)s)::bigint from {SCHEMA}.customers)""", {"f": fraction})
        cur.execute(f"delete from {SCHEMA}.customers where customer_no in (select customer_no from doomed)")
        customers = cur.rowcount
        cur.execute(f"delete from {SCHEMA}.truth where customer_no in (select customer_no from doomed)")
        cur.execute(f"""
            delete from {SCHEMA}.orders where customer_no in (select customer_no from doomed)
               or order_no in (select order_no from {SCHEMA}.orders order by md5(order_no)
                               limit (select floor(count(*) * %(f)s)::bigint from {SCHEMA}.orders))""",
                    {"f": fraction})
        orders = cur.rowcount
    conn.commit()
    return {"customers": customers, "orders": orders}


def add_column_drift(conn, *, rename: bool = True) -> list[str]:
    """Change the customers table the way an ERP upgrade does; commits and returns what changed.

    Adds `wechat_id` (harmless to an explicit select list) and, with `rename`, renames `mobile`
    to `mobile_phone`, which breaks the source YAML's query by name.
    """
    changes = ["added src_erp.customers.wechat_id"]
    with conn.cursor() as cur:
        cur.execute(f"alter table {SCHEMA}.customers add column if not exists wechat_id text")
        if rename:
            cur.execute(f"alter table {SCHEMA}.customers rename column mobile to mobile_phone")
            changes.append("renamed src_erp.customers.mobile to mobile_phone")
    conn.commit()
    return changes


def ensure_reader(conn, *, login: str | None = None, password: str | None = None):
    """The ERP's read-only login (default `<database>_reader`) through an administrator's `conn`.

    SELECT on `src_erp.customers` and `src_erp.orders` only, every session read-only
    (`default_transaction_read_only`); `password` else a generated one. Call it again after `seed`,
    which recreates the tables (and so drops their grants). Commits; returns a `crm_sync.db.Login`.
    """
    from crm_sync import db

    return db.grant_table_reader(conn, SCHEMA, READABLE_TABLES, login=login, password=password)


def shift_distribution(conn, share: float = 0.4) -> int:
    """A distribution shift an upstream change causes: `share` of the customers lose their e-mail
    (the same rows every time, by a hash of the key); nothing else changes. Commits; rows changed."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    with conn.cursor() as cur:
        cur.execute(f"""
            update {SCHEMA}.customers set email = null
            where customer_no in (select customer_no from {SCHEMA}.customers where email is not null
                                  order by md5(customer_no)
                                  limit (select floor(count(*) * %(s)s)::bigint from {SCHEMA}.customers))""",
                    {"s": share})
        changed = cur.rowcount
    conn.commit()
    return changed
