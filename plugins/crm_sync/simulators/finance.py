"""The finance system (财务系统) as a PostgreSQL schema `cw` with legacy pinyin-abbreviation columns.

Tables: `kh_zl` customers (one row per company, keyed by its unified social credit code `nsrsbh`),
`fp` invoices, `ht` contracts and `sk` payments. Amounts are TEXT the way clerks and old exports
wrote them; only the invoice tax `se` is NUMERIC.

Guarantees:
- `seed(conn, people=..., seed=..., now=...)` replaces the schema and writes exactly the same rows
  for the same people, seed and `now`. About 30% of the companies the people work for are finance
  customers; each row's contact is one person of that company. A company's `nsrsbh` depends on its
  name only (the same company gets the same tax id in every pool) and carries valid check characters.
- Every amount is an exact two-decimal value built from integer cents, so no float ever touches
  it, and each text form reads back to exactly that value with `crm_sync.money.parse_money`:
  `1234.50`, `1,234.50`, `¥1,234.5` / `￥1,234.5`, `1234.5元`, full-width `１，２３４．５０`, `$1,234.50`
  (USD rows), `(1,234.50)` for refunds (payments only). About 2% of the amounts, and at least one
  invoice, contract and payment of every seed, are so large (16 integer digits) that a float loses
  a digit. Contract amounts `htje` are always decimal-comma text
  (`1.234,50`). Invoice `jshj` is exactly `je + se`.
- About 3% of invoices and payments reference a tax id that has no `kh_zl` row yet: orphans. The
  result's `truth` names them; the next `apply_changes` keys their customers in.
- `truth` holds the exact `Decimal` of every amount cell, the sums per table and column, the row
  counts and, for every tax id, the company and the person behind its contact. `cw.truth` and
  `cw.truth_backlog` keep the hidden part in the database too; the pipeline never reads them.
- Every `gxsj` lies in the 30 days before `now`, never at or after it; `apply_changes` is one more
  business day with every change stamped in the hour before `now`.
- `ensure_reader` makes the login an integration gets from the finance team: it reads the four
  source tables (not `truth`, `truth_backlog`), and every session of it is read-only.
- Every function commits its own transaction; rows are written in bulk, not one by one.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Sequence

from crm_sync.simulators.people import CITIES, Person, generate_people, render_email, render_name, render_phone

SCHEMA = "cw"
# what an integration may read: cw.truth* is the tests' answer key, not finance data
READABLE_TABLES = ("kh_zl", "fp", "ht", "sk")

_CUSTOMER_COLUMNS = ("nsrsbh", "khmc", "lxr", "lxdh", "yx", "cs", "cjsj", "gxsj")
_INVOICE_COLUMNS = ("fphm", "gmf_nsrsbh", "kprq", "je", "se", "jshj", "bz", "zt", "gxsj")
_CONTRACT_COLUMNS = ("htbh", "nsrsbh", "htmc", "qdrq", "ksrq", "jsrq", "htje", "bz", "zt", "gxsj")
_PAYMENT_COLUMNS = ("skdh", "nsrsbh", "fphm", "skrq", "skje", "fkfs", "bz", "gxsj")

_DDL = """
drop schema if exists cw cascade;
create schema cw;
create table cw.kh_zl (nsrsbh text primary key, khmc text, lxr text, lxdh text, yx text, cs text,
                       cjsj timestamptz, gxsj timestamptz);
create table cw.fp (fphm text primary key, gmf_nsrsbh text, kprq date, je text, se numeric(18,2), jshj text,
                    bz text, zt text, gxsj timestamptz);
create table cw.ht (htbh text primary key, nsrsbh text, htmc text, qdrq date, ksrq date, jsrq date, htje text,
                    bz text, zt text, gxsj timestamptz);
create table cw.sk (skdh text primary key, nsrsbh text, fphm text, skrq date, skje text, fkfs text, bz text,
                    gxsj timestamptz);
create table cw.truth (nsrsbh text primary key, company text not null, person_id text not null);
create table cw.truth_backlog (like cw.kh_zl including all);
comment on table cw.truth is 'simulator truth: the company and contact person behind each tax id';
comment on table cw.truth_backlog is 'simulator truth: customers the clerk has not keyed in yet';
create index on cw.kh_zl (gxsj, nsrsbh);
create index on cw.fp (gxsj, fphm);
create index on cw.ht (gxsj, htbh);
create index on cw.sk (gxsj, skdh);
"""

# Area codes of one or two districts per city: the 3rd-8th characters of a credit code.
_DIVISIONS = {
    "北京": ("110105", "110108"), "上海": ("310115", "310104"), "广州": ("440106",), "深圳": ("440305", "440304"),
    "杭州": ("330106",), "成都": ("510107",), "武汉": ("420111",), "南京": ("320106",), "西安": ("610113",),
    "重庆": ("500103",), "天津": ("120116",), "苏州": ("320505",),
}
_USCC_CHARS = "0123456789ABCDEFGHJKLMNPQRTUWXY"  # GB 32100-2015: no I, O, S, V, Z
_USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_ORG_WEIGHTS = (3, 7, 9, 10, 5, 8, 4, 2)  # GB 11714 organisation code

_CNY = (("CNY", 40), ("RMB", 25), ("人民币", 25))
_TAX_RATES = ((13, 50), (6, 35), (9, 10), (3, 5))  # percent
_INVOICE_STATES = (("0", 85), ("1", 8), ("2", 7))  # normal, voided, red-letter
_CONTRACT_STATES = (("有效", 70), ("终止", 20), ("草稿", 10))
_CONTRACT_KINDS = ("技术服务合同", "设备采购合同", "软件许可合同", "运维保障合同", "咨询服务合同", "框架采购协议")
_METHODS = (("银行转账", 70), ("承兑汇票", 12), ("支票", 10), ("现金", 8))
_FORMS = {"CNY": (("plain", 25), ("grouped", 25), ("yen", 18), ("yuan", 17), ("fullwidth", 15)),
          "USD": (("plain", 30), ("grouped", 30), ("dollar", 30), ("fullwidth", 10))}
_FULLWIDTH = str.maketrans("0123456789,.", "０１２３４５６７８９，．")
_NEXT_CONTRACT_STATE = {"草稿": "有效", "有效": "终止"}
_AMOUNT_COLUMNS = {"fp": ("je", "se", "jshj"), "ht": ("htje",), "sk": ("skje",)}


@dataclass(frozen=True)
class FinanceTruth:
    rows: dict[str, int]                                 # table -> row count (kh_zl, fp, ht, sk)
    sums: dict[str, dict[str, Decimal]]                  # table -> amount column -> exact sum over all rows
    amounts: dict[str, dict[str, dict[str, Decimal]]]    # table -> amount column -> primary key -> value
    company_of: dict[str, str]                           # nsrsbh -> company name, orphans' included
    person_of: dict[str, str]                            # nsrsbh -> person_id of its contact
    orphan_tax_ids: list[str]                            # referenced by fp / sk, no kh_zl row yet
    orphan_invoices: list[str]
    orphan_payments: list[str]


@dataclass(frozen=True)
class FinanceSeedResult:
    customers: int
    invoices: int
    contracts: int
    payments: int
    truth: FinanceTruth


@dataclass(frozen=True)
class FinanceChangeResult:
    updated_customers: list[str] = field(default_factory=list)
    new_customers: list[str] = field(default_factory=list)     # includes the resolved orphans' tax ids
    resolved_orphans: list[str] = field(default_factory=list)
    updated_invoices: list[str] = field(default_factory=list)
    new_invoices: list[str] = field(default_factory=list)
    updated_contracts: list[str] = field(default_factory=list)
    updated_payments: list[str] = field(default_factory=list)
    new_payments: list[str] = field(default_factory=list)


def _insert(cur, table: str, columns: Sequence[str], rows: list[tuple]) -> None:
    from psycopg2.extras import execute_values

    if rows:
        execute_values(cur, f"insert into {SCHEMA}.{table} ({', '.join(columns)}) values %s", rows, page_size=1000)


def _pick(rng: random.Random, weighted: Sequence[tuple[str, int]]) -> str:
    return rng.choices([v for v, _ in weighted], [w for _, w in weighted])[0]


def _recent(rng: random.Random, now: datetime, max_seconds: int) -> datetime:
    # Whole seconds and at least one second back: strictly before `now`, whatever the reader's rounding.
    return now - timedelta(seconds=rng.randint(1, max_seconds))


def _company_city(company: str) -> str | None:
    return next((city for city in CITIES if company.startswith(city)), None)


def tax_id(company: str) -> str:
    """The company's 18-character unified social credit code, a function of its name alone."""
    digest = hashlib.sha256(company.encode()).digest()
    divisions = _DIVISIONS.get(_company_city(company) or "", ("110108",))
    body = ["MA" if digest[0] % 10 < 6 else f"{digest[1] % 100:02d}"]
    body += [_USCC_CHARS[b % 31] if body[0] == "MA" else str(b % 10) for b in digest[2:8]]
    org = "".join(body)
    org_sum = sum(w * int(c, 36) for w, c in zip(_ORG_WEIGHTS, org))
    org += {10: "X", 11: "0"}.get(11 - org_sum % 11, str(11 - org_sum % 11))
    code = "91" + divisions[digest[8] % len(divisions)] + org
    check = -sum(w * _USCC_CHARS.index(c) for w, c in zip(_USCC_WEIGHTS, code)) % 31
    return code + _USCC_CHARS[check]


def _cents(rng: random.Random, low: int, high: int, large: bool) -> int:
    # Large: 16 integer digits, beyond the 15.9 significant digits a binary float holds.
    cents = rng.randint(10**17, 8 * 10**17) if large else rng.randint(low, high)
    roundness = rng.choices((1, 10, 100), (60, 25, 15))[0]  # people like 1,234.50 and 5,000.00
    return max(roundness, cents - cents % roundness)


def _money(cents: int) -> Decimal:
    return Decimal(cents).scaleb(-2)


def render_amount(amount: Decimal, rng: random.Random, *, currency: str = "CNY") -> str:
    """One of the text forms a clerk writes `amount` in; negatives always as accounting `(1,234.50)`."""
    if amount < 0:
        return f"({amount.copy_abs():,.2f})"
    grouped = f"{amount:,.2f}"
    short = grouped.rstrip("0").rstrip(".")  # ¥1,234.5: the trailing zero a clerk leaves out
    form = _pick(rng, _FORMS["USD" if currency == "USD" else "CNY"])
    if form == "grouped":
        return grouped
    if form == "yen":
        return rng.choice("¥￥") + short
    if form == "yuan":
        return short.replace(",", "") + "元"
    if form == "dollar":
        return "$" + grouped
    if form == "fullwidth":
        return grouped.translate(_FULLWIDTH)
    return f"{amount:.2f}"


def render_decimal_comma(amount: Decimal) -> str:
    """`1.234,50`: the contract module's export format."""
    return f"{amount:,.2f}".translate(str.maketrans(",.", ".,"))


def _customer_row(person: Person, company: str, rng: random.Random, created_at: datetime,
                  updated_at: datetime) -> tuple:
    if person.landline and rng.random() < 0.4:
        phone = render_phone(person.landline, rng, extension=person.extension)
    else:
        phone = render_phone(person.mobile, rng)
    email = render_email(person.email, rng) if rng.random() < 0.8 else None
    return (tax_id(company), company, render_name(person, rng), phone, email, _company_city(company) or person.city,
            created_at, updated_at)


class _Ledger:
    """Numbers the documents and writes invoices, contracts and payments with their exact amounts."""

    def __init__(self, rng: random.Random, now: datetime, *, invoice_no: int = 1, contract_no: int = 1,
                 payment_no: int = 1, force_large: bool = False):
        self.rng, self.now = rng, now
        # the first invoice, contract and advance payment of a seed are large, so every data set has some
        self.pending_large = {"fp", "ht", "sk"} if force_large else set()
        self.invoice_no, self.contract_no, self.payment_no = invoice_no, contract_no, payment_no
        self.invoices: list[tuple] = []
        self.contracts: list[tuple] = []
        self.payments: list[tuple] = []
        self.amounts: dict[str, dict[str, dict[str, Decimal]]] = {
            t: {c: {} for c in cols} for t, cols in _AMOUNT_COLUMNS.items()}

    def _large(self, table: str) -> bool:
        if table in self.pending_large:
            self.pending_large.discard(table)
            return True
        return self.rng.random() < 0.02

    def _currency(self) -> str:
        return "USD" if self.rng.random() < 0.08 else _pick(self.rng, _CNY)

    def invoice(self, nsrsbh: str, gxsj: datetime, kprq: date, zt: str | None = None) -> tuple:
        rng = self.rng
        kprq = min(kprq, gxsj.date())
        je = _cents(rng, 10_000, 20_000_000, self._large("fp"))
        se = (je * _pick(rng, _TAX_RATES) + 50) // 100  # integer cents, half up
        currency = self._currency()
        fphm = f"{kprq:%y}{nsrsbh[2:4]}{self.invoice_no:016d}"  # 20 digits, like a fully digital invoice
        self.invoice_no += 1
        row = (fphm, nsrsbh, kprq, render_amount(_money(je), rng, currency=currency), _money(se),
               render_amount(_money(je + se), rng, currency=currency), currency, zt or _pick(rng, _INVOICE_STATES),
               gxsj)
        self.invoices.append(row)
        for column, cents in (("je", je), ("se", se), ("jshj", je + se)):
            self.amounts["fp"][column][fphm] = _money(cents)
        return row

    def contract(self, nsrsbh: str, gxsj: datetime) -> tuple:
        rng = self.rng
        qdrq = gxsj.date() - timedelta(days=rng.randint(0, 900))
        ksrq = qdrq + timedelta(days=rng.randint(0, 30))
        jsrq = ksrq + timedelta(days=365 * rng.randint(1, 3) - 1)
        amount = _money(_cents(rng, 100_000, 500_000_000, self._large("ht")))
        htbh = f"HT{qdrq.year}{self.contract_no:05d}"
        self.contract_no += 1
        row = (htbh, nsrsbh, f"{qdrq.year}年度{rng.choice(_CONTRACT_KINDS)}", qdrq, ksrq, jsrq,
               render_decimal_comma(amount), "USD" if rng.random() < 0.05 else _pick(rng, _CNY),
               _pick(rng, _CONTRACT_STATES), gxsj)
        self.contracts.append(row)
        self.amounts["ht"]["htje"][htbh] = amount
        return row

    def payment(self, nsrsbh: str, gxsj: datetime, invoice: tuple | None, *, refund: bool = False) -> tuple:
        rng = self.rng
        if invoice is None:  # an advance payment, not yet matched to an invoice
            amount = _money(_cents(rng, 10_000, 5_000_000, self._large("sk")))
            currency, fphm, skrq = self._currency(), None, gxsj.date() - timedelta(days=rng.randint(0, 20))
        else:
            fphm, kprq, currency = invoice[0], invoice[2], invoice[6]
            amount = self.amounts["fp"]["jshj"][fphm]
            if refund:
                amount = amount.copy_negate()
            if currency != "USD":
                currency = _pick(rng, _CNY)  # finance spells the same currency differently per module
            gxsj = max(gxsj, invoice[8])
            skrq = min(kprq + timedelta(days=rng.randint(0, 60)), gxsj.date())
        skdh = f"SK{self.payment_no:08d}"
        self.payment_no += 1
        row = (skdh, nsrsbh, fphm, skrq, render_amount(amount, rng, currency=currency), _pick(rng, _METHODS),
               currency, gxsj)
        self.payments.append(row)
        self.amounts["sk"]["skje"][skdh] = amount
        return row

    def write(self, cur) -> None:
        _insert(cur, "fp", _INVOICE_COLUMNS, self.invoices)
        _insert(cur, "ht", _CONTRACT_COLUMNS, self.contracts)
        _insert(cur, "sk", _PAYMENT_COLUMNS, self.payments)


def _trade(ledger: _Ledger, nsrsbh: str, *, invoices: int, contracts: int, window: int) -> tuple[list, list]:
    """Invoices, contracts and payments of one customer, `gxsj` within `window` seconds before now."""
    rng, now = ledger.rng, ledger.now
    issued = [ledger.invoice(nsrsbh, _recent(rng, now, window), (now - timedelta(days=rng.randint(0, 730))).date())
              for _ in range(invoices)]
    for _ in range(contracts):
        ledger.contract(nsrsbh, _recent(rng, now, window))
    paid = []
    for invoice in issued:
        if rng.random() < 0.7:
            paid.append(ledger.payment(nsrsbh, _recent(rng, now, window), invoice))
            if invoice[7] != "0":  # voided or red-letter after it was paid: the money goes back
                paid.append(ledger.payment(nsrsbh, _recent(rng, now, window), invoice, refund=True))
    if rng.random() < 0.15 or "sk" in ledger.pending_large:
        paid.append(ledger.payment(nsrsbh, _recent(rng, now, window), None))
    return issued, paid


def seed(conn, *, people: Sequence[Person], seed: int = 42, now: datetime) -> FinanceSeedResult:
    """Recreate `cw` with the customers, invoices, contracts and payments of `people`'s companies; commits."""
    rng = random.Random(f"finance:{seed}")
    staff: dict[str, list[Person]] = {}
    for person in people:
        staff.setdefault(person.company, []).append(person)
    companies = sorted(staff)
    chosen = [c for c in companies if rng.random() < 0.30]
    others = [c for c in companies if c not in chosen]
    orphans = rng.sample(others, min(len(others), max(1, round(0.03 * len(chosen)))))

    month = 30 * 86_400
    ledger = _Ledger(rng, now, force_large=True)
    customers, backlog, truth = [], [], []
    orphan_invoices, orphan_payments = [], []
    for company in chosen + orphans:
        contact = rng.choice(staff[company])
        updated_at = _recent(rng, now, month)
        created_at = min(updated_at, now - timedelta(days=rng.randint(30, 3 * 365), seconds=rng.randint(0, 86_399)))
        row = _customer_row(contact, company, rng, created_at, updated_at)
        truth.append((row[0], company, contact.person_id))
        if company in orphans:
            backlog.append(row)
            issued, paid = _trade(ledger, row[0], invoices=rng.randint(2, 5), contracts=0, window=month)
            orphan_invoices += [i[0] for i in issued]
            orphan_payments += [p[0] for p in paid]
        else:
            customers.append(row)
            _trade(ledger, row[0], invoices=rng.randint(1, 6), contracts=rng.choice((0, 0, 1, 1, 2)), window=month)
    with conn.cursor() as cur:
        cur.execute(_DDL)
        _insert(cur, "kh_zl", _CUSTOMER_COLUMNS, customers)
        _insert(cur, "truth_backlog", _CUSTOMER_COLUMNS, backlog)
        _insert(cur, "truth", ("nsrsbh", "company", "person_id"), truth)
        ledger.write(cur)
    conn.commit()
    counts = {"kh_zl": len(customers), "fp": len(ledger.invoices), "ht": len(ledger.contracts),
              "sk": len(ledger.payments)}
    return FinanceSeedResult(
        customers=counts["kh_zl"], invoices=counts["fp"], contracts=counts["ht"], payments=counts["sk"],
        truth=FinanceTruth(
            rows=counts,
            sums={t: {c: sum(values.values(), Decimal("0.00")) for c, values in cols.items()}
                  for t, cols in ledger.amounts.items()},
            amounts=ledger.amounts,
            company_of={n: c for n, c, _ in truth}, person_of={n: p for n, _, p in truth},
            orphan_tax_ids=[row[0] for row in backlog], orphan_invoices=orphan_invoices,
            orphan_payments=orphan_payments,
        ),
    )


def _next_number(cur, sql: str) -> int:
    cur.execute(sql)
    return (cur.fetchone()[0] or 0) + 1


def _new_companies(known: set[str], people: Sequence[Person], n: int, rng: random.Random,
                   id_prefix: str) -> list[tuple[str, Person]]:
    """`n` companies finance does not know yet with one contact each: from `people` first, then invented."""
    found: dict[str, list[Person]] = {}
    for person in people:
        if person.company not in known:
            found.setdefault(person.company, []).append(person)
    attempt = 0
    while len(found) < n and attempt < 20:
        attempt += 1
        for person in generate_people(12 * n, rng.randint(0, 2**31), id_prefix=f"{id_prefix}{attempt}"):
            if person.company not in known and (person.company in found or len(found) < n):
                found.setdefault(person.company, []).append(person)
    chosen = rng.sample(sorted(found), min(n, len(found)))
    return [(company, rng.choice(found[company])) for company in chosen]


def apply_changes(conn, *, seed: int, now: datetime, n_updates: int = 20, n_new: int = 10,
                  people: Sequence[Person] | None = None) -> FinanceChangeResult:
    """One business day: `n_updates` rows of each table change, the orphans' customers are keyed in,
    `n_new` new customers arrive (companies of `people` finance does not know, else invented ones),
    and new customers get invoices and payments. Every touched `gxsj` is in the hour before `now`. Commits.
    """
    from psycopg2.extras import execute_values

    rng = random.Random(f"finance-changes:{seed}:{now.isoformat()}")
    hour = 3_600
    result = FinanceChangeResult()
    with conn.cursor() as cur:
        cur.execute(f"select nsrsbh, lxr, lxdh, yx, cs from {SCHEMA}.kh_zl order by nsrsbh")
        customers = cur.fetchall()
        updates = []
        for nsrsbh, lxr, lxdh, yx, cs in rng.sample(customers, min(n_updates, len(customers))):
            change = rng.random()
            if change < 0.3:
                cs = rng.choice(list(CITIES))
            elif change < 0.6 and yx:
                yx = yx.strip().lower()
            elif change < 0.8 and lxdh:
                lxdh = lxdh.replace(" ", "").replace("-", "")
            elif lxr:
                lxr = lxr.strip()
            updates.append((nsrsbh, lxr, lxdh, yx, cs, _recent(rng, now, hour)))
            result.updated_customers.append(nsrsbh)
        execute_values(cur, f"""
            update {SCHEMA}.kh_zl k set lxr = v.lxr, lxdh = v.lxdh, yx = v.yx, cs = v.cs, gxsj = v.gxsj::timestamptz
            from (values %s) as v(nsrsbh, lxr, lxdh, yx, cs, gxsj) where k.nsrsbh = v.nsrsbh""", updates)

        cur.execute(f"select fphm, zt from {SCHEMA}.fp order by fphm")
        invoices = cur.fetchall()
        invoice_updates = []
        for fphm, zt in rng.sample(invoices, min(n_updates, len(invoices))):
            invoice_updates.append((fphm, rng.choice("12") if zt == "0" else zt, _recent(rng, now, hour)))
            result.updated_invoices.append(fphm)
        execute_values(cur, f"""
            update {SCHEMA}.fp f set zt = v.zt, gxsj = v.gxsj::timestamptz
            from (values %s) as v(fphm, zt, gxsj) where f.fphm = v.fphm""", invoice_updates)

        cur.execute(f"select htbh, zt from {SCHEMA}.ht order by htbh")
        contracts = cur.fetchall()
        contract_updates = []
        for htbh, zt in rng.sample(contracts, min(n_updates, len(contracts))):
            contract_updates.append((htbh, _NEXT_CONTRACT_STATE.get(zt, zt), _recent(rng, now, hour)))
            result.updated_contracts.append(htbh)
        execute_values(cur, f"""
            update {SCHEMA}.ht h set zt = v.zt, gxsj = v.gxsj::timestamptz
            from (values %s) as v(htbh, zt, gxsj) where h.htbh = v.htbh""", contract_updates)

        # an advance payment gets matched to an unpaid invoice of its payer, or the clerk corrects the method
        cur.execute(f"""
            select s.skdh, (select min(f.fphm) from {SCHEMA}.fp f
                            where s.fphm is null and f.gmf_nsrsbh = s.nsrsbh
                              and not exists (select 1 from {SCHEMA}.sk paid where paid.fphm = f.fphm))
            from {SCHEMA}.sk s order by s.skdh""")
        payments = cur.fetchall()
        payment_updates = []
        for skdh, unpaid_invoice in rng.sample(payments, min(n_updates, len(payments))):
            method = None if unpaid_invoice else _pick(rng, _METHODS)
            payment_updates.append((skdh, unpaid_invoice, method, _recent(rng, now, hour)))
            result.updated_payments.append(skdh)
        execute_values(cur, f"""
            update {SCHEMA}.sk s set fphm = coalesce(v.fphm, s.fphm), fkfs = coalesce(v.fkfs, s.fkfs),
                   gxsj = v.gxsj::timestamptz
            from (values %s) as v(skdh, fphm, fkfs, gxsj) where s.skdh = v.skdh""", payment_updates)

        # the clerk keys in the customers whose invoices were booked first
        cur.execute(f"select {', '.join(_CUSTOMER_COLUMNS)} from {SCHEMA}.truth_backlog order by nsrsbh")
        backlog = []
        for row in cur.fetchall():
            stamp = _recent(rng, now, hour)
            backlog.append(row[:6] + (stamp, stamp))
            result.resolved_orphans.append(row[0])
            result.new_customers.append(row[0])
        cur.execute(f"delete from {SCHEMA}.truth_backlog")

        cur.execute(f"select company from {SCHEMA}.truth")
        known = {row[0] for row in cur.fetchall()}
        ledger = _Ledger(
            rng, now,
            invoice_no=_next_number(cur, f"select max(right(fphm, 16)::bigint) from {SCHEMA}.fp"),
            contract_no=_next_number(cur, f"select max(right(htbh, 5)::int) from {SCHEMA}.ht"),
            payment_no=_next_number(cur, f"select max(substr(skdh, 3)::bigint) from {SCHEMA}.sk"))
        new_rows, truth = [], []
        for company, contact in _new_companies(known, people or (), n_new, rng, f"p-cw{seed}-{now:%Y%m%d%H%M}-"):
            stamp = _recent(rng, now, hour)
            row = _customer_row(contact, company, rng, stamp, stamp)
            new_rows.append(row)
            truth.append((row[0], company, contact.person_id))
            result.new_customers.append(row[0])
            for _ in range(rng.randint(1, 2)):
                invoice = ledger.invoice(row[0], _recent(rng, now, hour), now.date() - timedelta(days=1), zt="0")
                if rng.random() < 0.5:
                    ledger.payment(row[0], _recent(rng, now, hour), invoice)
        result.new_invoices.extend(i[0] for i in ledger.invoices)
        result.new_payments.extend(p[0] for p in ledger.payments)
        _insert(cur, "kh_zl", _CUSTOMER_COLUMNS, backlog + new_rows)
        _insert(cur, "truth", ("nsrsbh", "company", "person_id"), truth)
        ledger.write(cur)
    conn.commit()
    return result


def ensure_reader(conn, *, login: str | None = None, password: str | None = None):
    """The finance system's read-only login (default `<database>_reader`) through an administrator's `conn`.

    SELECT on `cw.kh_zl`, `cw.fp`, `cw.ht` and `cw.sk` only, every session read-only
    (`default_transaction_read_only`); `password` else a generated one. Call it again after `seed`,
    which recreates the tables (and so drops their grants). Commits; returns a `crm_sync.db.Login`.
    """
    from crm_sync import db

    return db.grant_table_reader(conn, SCHEMA, READABLE_TABLES, login=login, password=password)
