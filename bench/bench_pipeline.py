"""Pipeline benchmark: an ERP-shaped SQL source through every stage of its DAG, nightly then hourly.

    .venv/bin/python bench/bench_pipeline.py                      # 1,000,000 customers, 2,500,000 orders
    .venv/bin/python bench/bench_pipeline.py --customers 100000   # scaled down
    .venv/bin/python bench/bench_pipeline.py --customers 2000 --changes 200   # a smoke run

What it runs, on the server of `CRM_SYNC_BENCH_DSN` (an administrator's DSN) or else the embedded
PostgreSQL under `.local/pg-bench`, in two databases of its own (names carry the process id; both
dropped at the end unless `--keep`):
- setup, not timed: a source database with `src_erp.customers` (N) and `src_erp.orders` (2.5 N),
  generated set-based with `generate_series` (`seed_source`): Chinese names with the real surname
  skew and shared given names (王伟, 李娜), traditional, honorific and pinyin spellings, unique
  mobiles written eleven ways, company switchboards with extensions, shared `info@` mailboxes,
  5 % of the people entered twice under two customer numbers; and a migrated CRM database;
- nightly: the source's DAG `crm_sync__erp` as it is configured (`sync_mode: full`), every task in
  DAG order — extract (customers, orders), resolve, map (per stream), validate (per stream),
  load, reconcile — by calling the functions of `crm_sync.tasks` in this process with the context
  Airflow gives them (run id, data interval, params, `dag_run=None`) and the Airflow connections
  `crm_db` / `erp_src` as `AIRFLOW_CONN_*` variables;
- hourly: `--changes` customers change in the source (`change_source`: 4/5 existing customers get
  a new city, some a cleaned e-mail or mobile; 1/5 are new, a tenth of those a second record of
  a known person) with one changed or new order each (plus a second for half the new customers),
  stamped inside the next hour; then one run of the same DAG read incrementally (the source YAML
  with `sync_mode: incremental` and an hourly schedule, as tests/faults reads the ERP hourly:
  config is data), against the master the nightly run built;
- reference: a plain `COPY … FROM STDIN` of the nightly run's customer rows (exactly as
  `stg.mapped_customer` holds them, encoded by PostgreSQL's own `COPY … TO STDOUT` beforehand)
  into an unlogged scratch table without keys or indexes (as `bench_load.py` measures its raw COPY):
  the ceiling for writing those rows at all.

Per stage: seconds (streams summed) and peak memory — the peak, over the stage, of the Pss summed
over this process's tree and the database server's processes that serve the bench (the postmaster,
its auxiliary processes and the backends of the bench's two databases), sampled every 100 ms from
/proc. A server this machine cannot see (a remote DSN) is left out, and the output says so.
Imports the stages do lazily (Great Expectations, pandas, the identity engine) are made once
before timing and printed apart: a task process of Airflow pays them each time.
The source YAMLs are read from a copy of `include/` (others may edit the checkout meanwhile)
whose `statement_timeout_seconds` is raised to `--statement-timeout` (a 1M-row statement may
outlast the default 900 s).

- peer: dlt (`bench/dlt_peer.py`, in a virtualenv of its own under `.local/bench-dlt` made from
  `bench/requirements-dlt.txt`) merging the same rows — the nightly run's and then the hourly run's
  `stg.mapped_customer` and `stg.mapped_order` — into a third database of the same server, with
  each loader file format of `--dlt-formats` (`csv` is its COPY-based loader, `insert_values` its
  default); printed beside crm-sync's load stage. `--dlt-formats none` skips it.

Nothing about time is asserted. The last line is one JSON object: `nightly_total_s`,
`hourly_total_s`, `load_rows_per_s` (rows the nightly load published — customers plus orders —
per second of the load stage), `copy_rows_per_s`, `change_load_rows_per_s` (the same for the
hourly load's rows), `peak_mb`, per-stage figures and `dlt` (the peer's figures).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from crm_sync import db  # noqa: E402

SOURCE = "erp"
STAGES = ("extract", "resolve", "map", "validate", "load", "reconcile")
ORDERS_PER_CUSTOMER = 2.5
DUPLICATE_EVERY = 20        # every 20th customer record is a second record of a person already there
TARGETS = {"nightly_total_s": 300, "hourly_total_s": 30, "peak_mb": 4096}   # issue 11, at 1M customers

# --- the source: set-based generation ------------------------------------------------------------

SOURCE_DDL = """
create schema if not exists src_erp;
drop table if exists src_erp.customers, src_erp.orders;
create table src_erp.customers (
    customer_no text, name text, mobile text, phone text, email text, company text, city text,
    created_at timestamptz, updated_at timestamptz
);
create table src_erp.orders (
    order_no text, customer_no text, order_date date, amount numeric(18,2), currency text, status text,
    updated_at timestamptz
);
"""
SOURCE_INDEXES = """
alter table src_erp.customers add primary key (customer_no);
alter table src_erp.orders add primary key (order_no);
create index on src_erp.customers (updated_at, customer_no);
create index on src_erp.orders (updated_at, order_no);
analyze src_erp.customers;
analyze src_erp.orders;
"""


def vocabulary() -> dict:
    """Arrays the generator's SQL indexes into: names with their pinyin and traditional spelling,
    cities, companies with domain and switchboard, mobile prefixes, free mail domains."""
    import random

    import opencc
    from pypinyin import lazy_pinyin

    from crm_sync.simulators import people as ppl

    s2t = opencc.OpenCC("s2t")
    sur = [s for s, w in ppl.SURNAME_WEIGHTS.items() for _ in range(w)]   # the real skew, by repetition
    given: list[str] = []
    offsets: dict[str, list[int]] = {"common": [], "single": [], "pair": []}
    lengths: dict[str, list[int]] = {"common": [], "single": [], "pair": []}
    for gender in ("M", "F"):
        chars = ppl.GIVEN_CHARS[gender]
        for kind, names in (("common", list(ppl.COMMON_GIVEN[gender])), ("single", list(chars)),
                            ("pair", [a + b for a in chars for b in chars if a != b])):
            offsets[kind].append(len(given))
            lengths[kind].append(len(names))
            given += names
    cities = list(ppl.CITIES)
    rng = random.Random(11)
    companies = [(c, w, k) for c in cities for w in ppl._COMPANY_WORDS for k in ppl._COMPANY_KINDS]
    rng.shuffle(companies)   # a small source still gets companies of every city
    return {
        "sur": sur, "sur_py": ["".join(lazy_pinyin(s)) for s in sur], "sur_trad": [s2t.convert(s) for s in sur],
        "given": given, "given_py": [" ".join(lazy_pinyin(g)) for g in given],
        "given_trad": [s2t.convert(g) for g in given],
        "c_off": offsets["common"], "c_len": lengths["common"], "s_off": offsets["single"],
        "s_len": lengths["single"], "p_off": offsets["pair"], "p_len": lengths["pair"],
        "city": cities, "city_code": [ppl.CITIES[c] for c in cities],
        "co_name": [f"{c}{w}{k[0]}有限公司" for c, w, k in companies],
        "co_domain": [f"{''.join(lazy_pinyin(w))}-{k[1]}.com.cn" for c, w, k in companies],
        "co_city": [cities.index(c) + 1 for c, w, k in companies],
        "co_board": [f"{ppl.CITIES[c]}-{rng.randint(5, 8)}{rng.randint(0, 9_999_999):07d}" for c, w, k in companies],
        "prefix": list(ppl._MOBILE_PREFIXES), "free_mail": list(ppl._FREE_MAIL),
    }


# `h(x, salt)`: a non-negative 63-bit hash; persons draw from their person number, a record's
# spelling noise from its record number, so the two records of one person are spelled differently
_H = "(hashint8extended(({x})::bigint, {salt}) & 9223372036854775807)"


def _h(x: str, salt: int) -> str:
    return _H.format(x=x, salt=salt)


# A person `p` and one record `i` of it (relation g(i, p)): the customer columns, as a clerk typed them.
_CUSTOMER_ROWS = f"""
with v as (select %(sur)s::text[] sur, %(sur_py)s::text[] sur_py, %(sur_trad)s::text[] sur_trad,
                  %(given)s::text[] given, %(given_py)s::text[] given_py, %(given_trad)s::text[] given_trad,
                  %(c_off)s::int[] c_off, %(c_len)s::int[] c_len, %(s_off)s::int[] s_off, %(s_len)s::int[] s_len,
                  %(p_off)s::int[] p_off, %(p_len)s::int[] p_len, %(city)s::text[] city,
                  %(city_code)s::text[] city_code, %(co_name)s::text[] co_name, %(co_domain)s::text[] co_domain,
                  %(co_city)s::int[] co_city, %(co_board)s::text[] co_board, %(prefix)s::text[] prefix,
                  %(free_mail)s::text[] free_mail),
person as (
    select g.i, g.p,
           (1 + {_h('g.p', 1)} %% cardinality(v.sur))::int as s,
           ({_h('g.p', 2)} %% 2)::int as f,                          -- 0 male, 1 female
           {_h('g.p', 3)} %% 100 as gcat, {_h('g.p', 4)} as gh,
           v.prefix[(1 + {_h('g.p', 5)} %% cardinality(v.prefix))::int]
             || lpad(((g.p::bigint * 7919 + 4242) %% 100000000)::text, 8, '0') as mobile,
           (1 + {_h('g.p', 6)} %% least(cardinality(v.co_name), greatest(3, %(n_people)s / 12)))::int as co,
           {_h('g.p', 7)} %% 100 as city_roll, {_h('g.p', 8)} as lh, {_h('g.p', 9)} %% 100 as mail_roll,
           {_h('g.i', 101)} %% 100 as r_name, {_h('g.i', 102)} %% 100 as r_mobile,
           {_h('g.i', 103)} %% 100 as r_land, {_h('g.i', 104)} %% 100 as r_mail, {_h('g.i', 105)} %% 100 as r_misc,
           {_h('g.i', 106)} as r_time, {_h('g.p', 10)} as created_h
    from g cross join v
),
named as (
    select x.*, v.sur[x.s] as surname, v.sur_py[x.s] as surname_py, v.sur_trad[x.s] as surname_trad,
           v.given[x.gi] as given, v.given_py[x.gi] as given_py, v.given_trad[x.gi] as given_trad,
           v.co_name[x.co] as company, v.co_domain[x.co] as domain, v.co_board[x.co] as board,
           case when x.city_roll < 85 then v.city[v.co_city[x.co]]
                else v.city[(1 + x.city_roll %% cardinality(v.city))::int] end as city_name,
           case when x.city_roll < 85 then v.city_code[v.co_city[x.co]]
                else v.city_code[(1 + x.city_roll %% cardinality(v.city))::int] end as area,
           v.free_mail[(1 + x.lh %% cardinality(v.free_mail))::int] as free_mail
    from (select p.*, (1 + case when p.gcat < 45 then v.c_off[1 + p.f] + p.gh %% v.c_len[1 + p.f]
                               when p.gcat < 62 then v.s_off[1 + p.f] + p.gh %% v.s_len[1 + p.f]
                               else v.p_off[1 + p.f] + p.gh %% v.p_len[1 + p.f] end)::int as gi
          from person p cross join v) x cross join v
),
facts as (
    select n.*,
           case when n.lh %% 100 < 35 then split_part(n.board, '-', 1)
                when n.lh %% 100 < 55 then n.area end as land_area,
           case when n.lh %% 100 < 35 then split_part(n.board, '-', 2)
                when n.lh %% 100 < 55 then (5 + n.lh / 100 %% 4)::text || lpad((n.lh / 400 %% 10000000)::text, 7, '0')
           end as land_number,
           case when n.lh %% 100 < 35 then (100 + n.p %% 800)::text end as ext,
           case when n.mail_roll < 12 then 'info@' || n.domain
                when n.mail_roll < 55 then replace(n.given_py, ' ', '') || '.' || n.surname_py || n.p || '@' || n.domain
                else n.surname_py || replace(n.given_py, ' ', '') || n.p || '@' || n.free_mail end as email_true,
           substr(n.mobile, 1, 3) || ' ' || substr(n.mobile, 4, 4) || ' ' || substr(n.mobile, 8, 4) as grouped
    from named n
)
select 'C' || (100000 + f.i) as customer_no,
       case when f.r_name < 55 then f.surname || f.given
            when f.r_name < 63 then f.surname || case f.f when 0 then '先生' else '女士' end
            when f.r_name < 70 then f.surname || f.given || case f.f when 0 then '先生' else '女士' end
            when f.r_name < 82 then f.surname_trad || f.given_trad
            when f.r_name < 94 then initcap(f.surname_py) || ' ' || initcap(replace(f.given_py, ' ', ''))
            else f.surname || ' ' || f.given end as name,
       case when f.r_mobile < 28 then f.mobile
            when f.r_mobile < 42 then '+86 ' || f.grouped
            when f.r_mobile < 50 then '0086-' || f.mobile
            when f.r_mobile < 58 then '86 ' || f.mobile
            when f.r_mobile < 70 then replace(f.grouped, ' ', '-')
            when f.r_mobile < 78 then '(+86)' || f.mobile
            when f.r_mobile < 92 then translate(case when f.r_mobile < 85 then f.mobile else f.grouped end,
                                                '0123456789', '０１２３４５６７８９')
            when f.r_mobile < 98 then null
            else substr(f.mobile, 1, (5 + f.r_mobile %% 4)::int) end as mobile,
       case when f.land_number is null or f.r_land >= 98 then null
            when f.r_land >= 96 then substr(f.land_number, 1, 4)
            when f.r_land < 35 then f.land_area || '-' || f.land_number
                                    || coalesce(case when f.r_misc < 50 then '-' || f.ext end, '')
            when f.r_land < 60 then f.land_area || '-' || f.land_number || coalesce('转' || f.ext, '')
            when f.r_land < 75 then '(' || f.land_area || ')' || f.land_number || coalesce(' ext ' || f.ext, '')
            else f.land_area || f.land_number end as phone,
       case when f.r_mail < 5 then null
            when f.r_mail < 11 then upper(f.email_true)
            when f.r_mail < 20 then upper(left(f.email_true, 1)) || substr(f.email_true, 2)
            when f.r_mail < 30 then ' ' || f.email_true || ' '
            else f.email_true end as email,
       case when f.r_misc %% 10 = 0 then replace(f.company, '有限公司', '') else f.company end as company,
       case when f.r_misc %% 20 = 7 then null else f.city_name end as city,
       least(%(now)s::timestamptz - make_interval(days => (30 + f.created_h %% 1065)::int,
                                                  secs => (f.created_h / 1065 %% 86400)::int),
             %(now)s::timestamptz - make_interval(secs => (1 + f.r_time %% %(spread_s)s)::int)) as created_at,
       %(now)s::timestamptz - make_interval(secs => (1 + f.r_time %% %(spread_s)s)::int) as updated_at
from facts f
"""

_ORDER_ROWS = f"""
select 'SO' || lpad(o.j::text, 9, '0') as order_no,
       'C' || (100000 + o.c) as customer_no,
       (%(now)s::timestamptz - make_interval(days => ({_h('o.j', 201)} %% 730)::int))::date as order_date,
       ((1000 + {_h('o.j', 202)} %% 4999000)::numeric / 100)::numeric(18,2) as amount,
       case when {_h('o.j', 203)} %% 100 < 90 then 'CNY' when {_h('o.j', 203)} %% 100 < 95 then 'USD'
            when {_h('o.j', 203)} %% 100 < 98 then 'HKD' else 'EUR' end as currency,
       (array['completed', 'completed', 'completed', 'shipped', 'shipped', 'paid', 'open', 'cancelled',
              'refunded', 'completed'])[(1 + {_h('o.j', 204)} %% 10)::int] as status,
       %(now)s::timestamptz - make_interval(secs => (1 + {_h('o.j', 205)} %% %(spread_s)s)::int) as updated_at
from o
"""


def seed_source(cur, customers: int, now: datetime, vocab: dict) -> tuple[int, int]:
    """Fill `src_erp` with `customers` customer records and 2.5 times as many orders, all updated in
    the 30 days before `now`; set-based. Returns (customers, orders)."""
    cur.execute(SOURCE_DDL)
    params = {**vocab, "now": now, "n_people": customers, "spread_s": 30 * 86_400}
    cur.execute(
        f"""insert into src_erp.customers
            with g as (select i, case when i %% {DUPLICATE_EVERY} = 0 then i - 13 else i end as p
                       from generate_series(1, %(n)s) i)
            {_CUSTOMER_ROWS.replace('with v as', ', v as', 1)}""",
        {**params, "n": customers})
    orders = round(customers * ORDERS_PER_CUSTOMER)
    cur.execute(
        f"""insert into src_erp.orders
            with o as (select j, (j - 1) %% %(n)s + 1 as c from generate_series(1, %(orders)s) j)
            {_ORDER_ROWS}""",
        {**params, "n": customers, "orders": orders})
    cur.execute(SOURCE_INDEXES)
    return customers, orders


def change_source(cur, customers: int, changes: int, start: datetime, vocab: dict) -> dict:
    """One busy hour in the source after `start`: `changes` customers change or arrive, each with one
    order that changes or arrives (half the new customers with a second one). Set-based."""
    new = max(1, changes // 5)
    updated = changes - new
    step = max(1, customers // max(1, updated))
    within = {"start": start, "hour_s": 3_590}
    stamp = f"%(start)s::timestamptz + make_interval(secs => (1 + {_h('{x}', 301)} %% %(hour_s)s)::int)"
    # existing customers: a new city always (so the row really changes), some a cleaned e-mail or mobile
    cur.execute(
        f"""update src_erp.customers c set
                city = (%(city)s::text[])[(1 + ({_h('u.i', 302)} %% 11 + coalesce(array_position(%(city)s::text[],
                        c.city), 0)) %% 12)::int],
                email = case when u.i %% 10 < 3 then lower(btrim(c.email)) else c.email end,
                mobile = case when u.i %% 10 >= 7 then translate(regexp_replace(c.mobile, '[ ()+-]', '', 'g'),
                         '０１２３４５６７８９', '0123456789') else c.mobile end,
                updated_at = {stamp.format(x='u.i')}
            from (select k * %(step)s as i from generate_series(1, %(updated)s) k) u
            where c.customer_no = 'C' || (100000 + u.i)""",
        {**within, "city": vocab["city"], "step": step, "updated": updated})
    touched = cur.rowcount
    # new customers: new people, one in ten a second record of a person the source already has
    cur.execute(
        f"""insert into src_erp.customers
            with g as (select %(n)s + k as i,
                              case when k %% 10 = 0 then (k * 7919) %% %(n)s + 1 else %(n)s + k end as p
                       from generate_series(1, %(new)s) k)
            {_CUSTOMER_ROWS.replace('with v as', ', v as', 1)}""",
        {**vocab, "n": customers, "new": new, "now": start + timedelta(hours=1), "n_people": customers,
         "spread_s": 3_590})
    arrived = cur.rowcount
    cur.execute("select count(*) from src_erp.orders")
    orders = cur.fetchone()[0]
    cur.execute(
        f"""update src_erp.orders o set
                status = case o.status when 'open' then 'paid' when 'paid' then 'shipped'
                                       when 'shipped' then 'completed' else 'refunded' end,
                updated_at = {stamp.format(x='u.j')}
            from (select k * %(step)s as j from generate_series(1, %(updated)s) k) u
            where o.order_no = 'SO' || lpad(u.j::text, 9, '0')""",
        {**within, "step": max(1, orders // max(1, updated)), "updated": updated})
    orders_changed = cur.rowcount
    cur.execute(
        f"""insert into src_erp.orders
            with o as (select %(orders)s + k as j, %(n)s + (k - 1) %% %(new)s + 1 as c
                       from generate_series(1, %(count)s) k)
            {_ORDER_ROWS}""",
        {"orders": orders, "n": customers, "new": new, "count": new + new // 2,
         "now": start + timedelta(hours=1), "spread_s": 3_590})
    orders_new = cur.rowcount
    cur.execute("analyze src_erp.customers; analyze src_erp.orders")
    return {"customers_changed": touched, "customers_new": arrived, "orders_changed": orders_changed,
            "orders_new": orders_new}


# --- memory: summed Pss of this process tree and of the server processes serving the bench --------

class PssPeak:
    """Peak of the Pss summed, at one instant, over this process's tree and the bench's server processes, MB.

    A background thread samples /proc every `interval` s. Server processes: the postmaster (when
    its data directory is on this machine: `postmaster.pid`), its auxiliary processes, and the
    backends whose command line names one of `databases` (other databases of a shared server are
    left out). Pss splits shared pages (shared_buffers, a forked worker's copy-on-write pages)
    between the processes that map them, so the sum is the memory the whole pipeline holds."""

    def __init__(self, server_pid: int | None, databases: tuple[str, ...], interval: float = 0.1) -> None:
        self.server_pid, self.databases, self.interval = server_pid, databases, interval
        self.mb = self.overall = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-peak", daemon=True)

    def __enter__(self) -> "PssPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _children(pid: int) -> list[int]:
        out: list[int] = []
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as fh:
                    out.extend(int(c) for c in fh.read().split())
        except OSError:
            pass
        return out

    def _tree(self, root: int) -> list[int]:
        pids, todo = [], [root]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(self._children(pid))
        return pids

    def _server(self) -> list[int]:
        if self.server_pid is None:
            return []
        pids = [self.server_pid]
        for pid in self._children(self.server_pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    title = fh.read().replace(b"\x00", b" ").decode(errors="replace")
            except OSError:
                continue
            words = title.split()
            # a backend's title is "postgres: <user> <database> <client> <state>"; other titles name a role
            backend = len(words) >= 4 and ("(" in words[3] or words[3] == "[local]")
            if not backend or any(d in words[2:3] for d in self.databases):
                pids.append(pid)
        return pids

    def sample(self) -> float:
        total = 0
        for pid in self._tree(os.getpid()) + self._server():
            try:
                with open(f"/proc/{pid}/smaps_rollup") as fh:
                    for row in fh:
                        if row.startswith("Pss:"):
                            total += int(row.split()[1])
                            break
            except OSError:
                continue
        mb = total / 1024
        self.mb = max(self.mb, mb)
        self.overall = max(self.overall, mb)
        return mb

    def reset(self) -> None:
        self.mb = 0.0
        self.sample()

    def peak(self) -> float:
        self.sample()
        return self.mb

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


def server_pid(conn) -> int | None:
    """The postmaster's pid when the server's data directory is readable here, else None."""
    try:
        with conn.cursor() as cur:
            cur.execute("select setting from pg_settings where name = 'data_directory'")
            row = cur.fetchone()
        conn.commit()
        with open(Path(row[0]) / "postmaster.pid") as fh:
            pid = int(fh.readline())
        return pid if os.path.exists(f"/proc/{pid}") else None
    except Exception:  # noqa: BLE001 - a remote or unreadable server: its memory is not counted
        conn.rollback()
        return None


# --- the runs -------------------------------------------------------------------------------------

def include_copy(into: Path, statement_timeout_s: int) -> Path:
    include = into / "include"
    shutil.copytree(ROOT / "include", include)
    patch_source(include, statement_timeout_seconds=statement_timeout_s)
    return include


def patch_source(include: Path, **changes) -> None:
    import yaml

    path = include / "sources" / f"{SOURCE}.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc.update(changes)
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")


def warm_up() -> float:
    """Import what the stages import lazily and look an Airflow connection up, once; the seconds it took."""
    t0 = time.perf_counter()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations  # noqa: F401
    from airflow.sdk import BaseHook

    from crm_sync import load, mapping, reconcile, tasks  # noqa: F401
    from crm_sync.identity import engine, resolve  # noqa: F401
    from crm_sync.quality import drift, validate, volume  # noqa: F401
    from crm_sync.sources.base import extractor_class

    extractor_class("sql")
    BaseHook.get_connection("crm_db")
    tasks.quiet_libraries()
    for name in ("crm_sync", "airflow"):   # the stages' INFO lines would bury the figures
        logging.getLogger(name).setLevel(logging.WARNING)
    return time.perf_counter() - t0


def run_dag(run_id: str, start: datetime, end: datetime, memory: PssPeak) -> tuple[dict, dict]:
    """Every task of the source's DAG in order, in this process; (per-stage figures, task outputs)."""
    from crm_sync import tasks
    from crm_sync.config import load_source

    cfg = load_source(SOURCE)
    context = {"run_id": run_id, "data_interval_start": start, "data_interval_end": end, "params": {},
               "dag_run": None}
    streams = [s.name for s in cfg.streams]
    plan = {
        "extract": [(f"extract.{s}", lambda s=s: tasks.extract(SOURCE, s, context)) for s in streams],
        "resolve": [("resolve.identities", lambda: tasks.resolve(SOURCE, context))],
        "map": [(f"map.{s}", lambda s=s: tasks.map_stream(SOURCE, s, context)) for s in streams],
        "validate": [(f"validate.{s}", lambda s=s: tasks.validate_stream(SOURCE, s, context)) for s in streams],
        "load": [("load.publish", lambda: tasks.load(SOURCE, context))],
        "reconcile": [("reconcile.check", lambda: tasks.reconcile(SOURCE, context))],
    }
    figures: dict[str, dict] = {}
    outputs: dict[str, object] = {}
    for stage in STAGES:
        memory.reset()
        t0 = time.perf_counter()
        for task_id, call in plan[stage]:
            outputs[task_id] = call()
        seconds = time.perf_counter() - t0
        figures[stage] = {"s": round(seconds, 2), "peak_mb": round(memory.peak())}
        print(f"    {stage:<10} {seconds:>9.1f} s {figures[stage]['peak_mb']:>8,} MB  "
              + "; ".join(f"{t}: {_short(outputs[t])}" for t, _ in plan[stage]), flush=True)
    return figures, outputs


def _short(output) -> str:
    if not isinstance(output, dict):
        return str(output)
    keep = {k: v for k, v in output.items()
            if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k not in ("since", "until")}
    return ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in keep.items())


def published(load_output: dict) -> int:
    """Rows the load stage published: its customer records and the facts of every entity."""
    from crm_sync import entities

    return load_output["customers"] + sum(load_output.get(e.name, 0) for e in entities.FACTS)


def plain_copy(conn, run_id: str) -> tuple[int, float]:
    """(rows, seconds) of a plain COPY FROM STDIN of the run's customer rows into a scratch table."""
    buf = io.BytesIO()
    with conn.cursor() as cur:
        cur.execute("create unlogged table stg.bench_copy_scratch (like stg.mapped_customer)")
        cur.copy_expert(cur.mogrify("copy (select * from stg.mapped_customer where run_id = %s and source = %s)"
                                    " to stdout", (run_id, SOURCE)).decode(), buf)
    conn.commit()
    buf.seek(0)
    t0 = time.perf_counter()
    with conn.cursor() as cur:
        cur.copy_expert("copy stg.bench_copy_scratch from stdin", buf, size=1 << 20)
        rows = cur.rowcount
    conn.commit()
    seconds = time.perf_counter() - t0
    with conn.cursor() as cur:
        cur.execute("drop table stg.bench_copy_scratch")
    conn.commit()
    return rows, seconds


def run_log(conn, run_id: str) -> dict:
    with conn.cursor() as cur:
        cur.execute("select * from sync.run_log where run_id = %s and source = %s", (run_id, SOURCE))
        row = cur.fetchone()
        names = [d[0] for d in cur.description]
    conn.commit()
    return dict(zip(names, row)) if row else {}


def dlt_peer(admin: str, crm_dsn: str, first: str, change: str, formats: str, tag: int) -> dict | None:
    """dlt merging the rows of runs `first` and `change` into a database of its own; its figures (or None)."""
    import subprocess

    if formats in ("", "none"):
        return None
    venv = ROOT / ".local" / "bench-dlt"
    python = venv / "bin" / "python"
    requirements = ROOT / "bench" / "requirements-dlt.txt"
    stamp = venv / ".installed"
    uv = Path(sys.executable).parent / "uv"
    if not stamp.exists() or stamp.read_text() != requirements.read_text():
        print(f"  setup (not timed): installing the peer into {venv.relative_to(ROOT)} (bench/requirements-dlt.txt)",
              flush=True)
        subprocess.run([str(uv), "venv", "-q", "--allow-existing", "-p", sys.executable, str(venv)], check=True)
        subprocess.run([str(uv), "pip", "install", "-q", "--python", str(python), "-r", str(requirements)],
                       check=True)
        stamp.write_text(requirements.read_text())
    dest = f"dlt_bench_pipeline_{tag}"
    db.ensure_database(admin, dest)
    try:
        done = subprocess.run([str(python), str(ROOT / "bench" / "dlt_peer.py"), "--source-dsn", crm_dsn,
                               "--dest-dsn", db.with_database(admin, dest), "--first", first, "--change", change,
                               "--formats", formats], capture_output=True, text=True)
    finally:
        db.drop_database(admin, dest)
    if done.returncode != 0:
        print(f"  dlt peer failed (exit {done.returncode}); its last lines:\n"
              + "\n".join("    " + line for line in (done.stderr or done.stdout).strip().splitlines()[-8:]))
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_peer(peer: dict | None, crm: dict, copy_rate: float | None) -> None:
    """crm-sync's load stage and dlt's merge of the same rows, side by side."""
    print(f"\n  load stage against dlt {peer['dlt_version'] if peer else ''} (the same rows, the same server):")
    print(f"    {'':<44} {'first load':>12} {'rows/s':>9} {'1 % change':>12} {'rows/s':>9}")

    def line(label, first_s, first_rows, change_s, change_rows):
        def cell(s, rows):
            return (f"{s:>10.1f} s {rows / s:>9,.0f}" if s else f"{'–':>12} {'':>9}")
        print(f"    {label:<44} {cell(first_s, first_rows)} {cell(change_s, change_rows)}")

    line("crm-sync load stage (links, golden records)", crm["first_s"], crm["first_rows"], crm["change_s"],
         crm["change_rows"])
    for fmt, figures in (peer or {}).items():
        if fmt == "dlt_version":
            continue
        first, change = figures["first_load"], figures["change"]
        name = {"csv": "COPY-based loader", "insert_values": "default loader"}.get(fmt, fmt)
        line(f"dlt merge, {fmt} ({name})", first["seconds"], first["rows"], change["seconds"], change["rows"])
        line("  of which dlt's load step", first["load_s"], first["rows"], change["load_s"], change["rows"])
    if copy_rate:
        print(f"    {'plain COPY of the customer rows (ceiling)':<44} {'':>12} {copy_rate:>9,.0f}")
    if peer is None:
        print("    (dlt not run: --dlt-formats none, or it failed)")


def admin_dsn() -> tuple[str, bool]:
    dsn = os.environ.get("CRM_SYNC_BENCH_DSN")
    if dsn:
        return dsn, False
    return db.embedded_server_uri(ROOT / ".local" / "pg-bench"), True


def _total(figures: dict) -> float:
    return round(sum(f["s"] for f in figures.values()), 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--customers", type=int, default=1_000_000, help="customer records in the source")
    parser.add_argument("--changes", type=int, default=10_000, help="customers changed for the hourly run")
    parser.add_argument("--statement-timeout", type=int, default=3_600,
                        help="statement_timeout_seconds of the source YAML for this run")
    parser.add_argument("--keep", action="store_true", help="keep the two databases afterwards")
    parser.add_argument("--dlt-formats", default="csv,insert_values",
                        help="dlt loader file formats to compare the load stage with ('none' skips the peer)")
    args = parser.parse_args(argv)
    n, changes = args.customers, min(args.changes, args.customers)

    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still drops the databases
    wall0 = time.perf_counter()
    admin, embedded = admin_dsn()
    tag = os.getpid()
    crm_db, src_db = f"crm_bench_pipeline_{tag}", f"erp_bench_pipeline_{tag}"
    # the nightly interval ends on an hour two hours back: the hourly changes lie in the past as well
    hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    night_end = hour - timedelta(hours=2)
    nightly_id = f"scheduled__{night_end.isoformat()}"
    hourly_id = f"scheduled__{(night_end + timedelta(hours=1)).isoformat()}"

    with ExitStack() as cleanup:
        for name in (crm_db, src_db):
            db.ensure_database(admin, name)
            if not args.keep:
                cleanup.callback(db.drop_database, admin, name)
        crm_dsn, src_dsn = db.with_database(admin, crm_db), db.with_database(admin, src_db)
        workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="crm-bench-pipeline-")))
        include = include_copy(workdir, args.statement_timeout)
        os.environ["CRM_SYNC_INCLUDE_DIR"] = str(include)
        os.environ["AIRFLOW_CONN_CRM_DB"] = db.airflow_conn_json(crm_dsn)
        os.environ["AIRFLOW_CONN_ERP_SRC"] = db.airflow_conn_json(src_dsn)

        conn = db.connect(crm_dsn, application_name="crm-sync-bench")
        cleanup.callback(conn.close)
        db.migrate(conn)
        conn.commit()
        memory = cleanup.enter_context(PssPeak(server_pid(conn), (crm_db, src_db)))
        print(f"crm-sync pipeline benchmark: source '{SOURCE}' with {n:,} customers and "
              f"{round(n * ORDERS_PER_CUSTOMER):,} orders, then {changes:,} changed customers; "
              f"CRM {db.redact_dsn(crm_dsn)}")
        if memory.server_pid is None:
            print("  memory: the database server's processes are not visible here; peaks are this process tree's")

        vocab = vocabulary()
        src = db.connect(src_dsn, application_name="crm-sync-bench")
        cleanup.callback(src.close)
        t0 = time.perf_counter()
        with src.cursor() as cur:
            seeded = seed_source(cur, n, night_end - timedelta(minutes=5), vocab)
        src.commit()
        print(f"  setup (not timed): source generated set-based in {time.perf_counter() - t0:.1f} s "
              f"({seeded[0]:,} customers, {seeded[1]:,} orders)")
        imports_s = warm_up()
        print(f"  setup (not timed): the stages' lazy imports and Airflow's connection lookup took {imports_s:.1f} s "
              "(an Airflow task process pays its share of them on every task)")

        print(f"\n  nightly full refresh ({nightly_id}):", flush=True)
        nightly, nightly_out = run_dag(nightly_id, night_end - timedelta(days=1), night_end, memory)
        nightly_log = run_log(conn, nightly_id)
        copied, copy_s = plain_copy(conn, nightly_id)

        t0 = time.perf_counter()
        with src.cursor() as cur:
            changed = change_source(cur, n, changes, night_end, vocab)
        src.commit()
        print(f"\n  setup (not timed): {changed} in {time.perf_counter() - t0:.1f} s; the source YAML now reads "
              "the ERP incrementally, hourly")
        patch_source(include, sync_mode="incremental", schedule="0 * * * *")
        print(f"  hourly incremental ({hourly_id}):", flush=True)
        hourly, _ = run_dag(hourly_id, night_end, night_end + timedelta(hours=1), memory)
        hourly_log = run_log(conn, hourly_id)
        with conn.cursor() as cur:
            cur.execute("select count(*) filter (where merged_into is null), count(*) from crm.customer")
            live, customers = cur.fetchone()
        conn.commit()
        peak = memory.overall
        with conn.cursor() as cur:   # the rows each run handed to its load: what the peer merges too
            cur.execute("select (select count(*) from stg.mapped_customer where run_id = %(r)s)"
                        " + (select count(*) from stg.mapped_order where run_id = %(r)s)", {"r": hourly_id})
            change_rows = cur.fetchone()[0]
        conn.commit()
        peer = dlt_peer(admin, crm_dsn, nightly_id, hourly_id, args.dlt_formats, tag)

    nightly_s, hourly_s = _total(nightly), _total(hourly)
    loaded = published(nightly_out["load.publish"])
    load_rate = loaded / nightly["load"]["s"] if nightly["load"]["s"] else None
    copy_rate = copied / copy_s if copy_s else None
    change_rate = change_rows / hourly["load"]["s"] if hourly["load"]["s"] else None

    def log_line(log: dict) -> str:
        return (f"extracted {log.get('rows_extracted') or 0:,}, loaded {log.get('rows_loaded') or 0:,}, "
                f"rejected {log.get('rows_rejected') or 0:,}, unchanged {log.get('rows_unchanged') or 0:,}; "
                f"identities new {log.get('ids_new') or 0:,}, linked {log.get('ids_linked') or 0:,}, "
                f"merged {log.get('ids_merged') or 0:,}, review {log.get('ids_review') or 0:,}; "
                f"state {log.get('state')}")

    print()
    print(f"  {'stage':<10} {'nightly s':>10} {'peak MB':>9} {'hourly s':>10} {'peak MB':>9}")
    for stage in STAGES:
        print(f"  {stage:<10} {nightly[stage]['s']:>10.1f} {nightly[stage]['peak_mb']:>9,} "
              f"{hourly[stage]['s']:>10.1f} {hourly[stage]['peak_mb']:>9,}")
    print(f"  {'total':<10} {nightly_s:>10.1f} {'':>9} {hourly_s:>10.1f}")
    print(f"  nightly: {log_line(nightly_log)}")
    print(f"  hourly:  {log_line(hourly_log)}")
    print(f"  master: {live:,} live customers ({customers:,} rows with merged-away ones)")
    scale = "" if n == 1_000_000 else f" (targets are for 1,000,000 customers; this run has {n:,})"
    print(f"  nightly total {nightly_s:,.1f} s, target ≤ {TARGETS['nightly_total_s']} s{scale}")
    print(f"  hourly total {hourly_s:,.1f} s for {changes:,} changes, target ≤ {TARGETS['hourly_total_s']} s{scale}")
    print(f"  peak memory (summed Pss) {peak:,.0f} MB, target ≤ {TARGETS['peak_mb']:,} MB")
    if load_rate and copy_rate:
        print(f"  load stage {load_rate:,.0f} rows/s ({loaded:,} customers + orders) against a plain COPY of the "
              f"customer rows {copy_rate:,.0f} rows/s ({load_rate / copy_rate:.0%}; target ≥ 25 % on a first load)")
    if change_rate and copy_rate:
        print(f"  hourly load {change_rate:,.0f} rows/s ({change_rows:,} rows of a 1 % change) against the plain COPY "
              f"({change_rate / copy_rate:.0%}; target ≥ 50 % on a 1 % change)")
    print_peer(peer, {"first_s": nightly["load"]["s"], "first_rows": loaded, "change_s": hourly["load"]["s"],
                      "change_rows": change_rows}, copy_rate)
    print(f"  wall time of the benchmark (setup included): {time.perf_counter() - wall0:,.0f} s")
    print(json.dumps({
        "customers": n, "orders": round(n * ORDERS_PER_CUSTOMER), "changes": changes,
        "nightly_total_s": nightly_s, "hourly_total_s": hourly_s,
        "load_rows_per_s": round(load_rate) if load_rate else None,
        "copy_rows_per_s": round(copy_rate) if copy_rate else None,
        "change_load_rows_per_s": round(change_rate) if change_rate else None,
        "peak_mb": round(peak), "imports_s": round(imports_s, 1),
        "stages": {"nightly": nightly, "hourly": hourly}, "dlt": peer,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
