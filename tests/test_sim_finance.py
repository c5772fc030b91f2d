"""The finance simulator writes money the messy legacy way, and its truth says exactly what it means."""
from __future__ import annotations

import re
from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from crm_sync.money import parse_money
from crm_sync.simulators import finance
from crm_sync.simulators.people import generate_people

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
PEOPLE = generate_people(1200, 7)
PEOPLE_BY_ID = {p.person_id: p for p in PEOPLE}
TABLES = {"kh_zl": "nsrsbh", "fp": "fphm", "ht": "htbh", "sk": "skdh"}

USCC_CHARS = "0123456789ABCDEFGHJKLMNPQRTUWXY"
USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)

# how a clerk wrote an amount; the first pattern that matches names the form
AMOUNT_FORMS = {
    "plain": r"\d+\.\d{2}",
    "grouped": r"\d{1,3}(,\d{3})+\.\d{2}",
    "yen": r"[¥￥]\d{1,3}(,\d{3})*(\.\d{1,2})?",
    "yuan": r"\d+(\.\d{1,2})?元",
    "dollar": r"\$\d{1,3}(,\d{3})*\.\d{2}",
    "fullwidth": r"[０-９]{1,3}(，[０-９]{3})*．[０-９]{2}",
    "parentheses": r"\(\d{1,3}(,\d{3})*\.\d{2}\)",
}
DECIMAL_COMMA = r"\d{1,3}(\.\d{3})*,\d{2}"


def amount_form(text: str) -> str:
    return next((name for name, pattern in AMOUNT_FORMS.items() if re.fullmatch(pattern, text)), "other")


def dump(conn) -> dict[str, list[tuple]]:
    with conn.cursor() as cur:
        tables = {}
        for table, key in {**TABLES, "truth": "nsrsbh", "truth_backlog": "nsrsbh"}.items():
            cur.execute(f"select * from cw.{table} order by {key}")
            tables[table] = cur.fetchall()
    return tables


def rows(conn, sql: str, params=None) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def exact(text: str | None, **kwargs) -> Decimal:
    value = parse_money(text, scale=2, **kwargs)
    assert value is not None and value.as_tuple().exponent == -2
    return value


@pytest.fixture()
def seeded(conn):
    return finance.seed(conn, people=PEOPLE, seed=42, now=NOW)


def test_seed_is_deterministic(conn):
    first = finance.seed(conn, people=PEOPLE, seed=5, now=NOW)
    tables = dump(conn)
    again = finance.seed(conn, people=PEOPLE, seed=5, now=NOW)
    assert again == first and dump(conn) == tables
    other = finance.seed(conn, people=PEOPLE, seed=6, now=NOW)
    assert other != first and dump(conn) != tables


def test_customers_are_companies_with_valid_stable_tax_ids(conn, seeded):
    truth = seeded.truth
    customers = rows(conn, "select nsrsbh, khmc, lxr, lxdh, yx, cs, cjsj, gxsj from cw.kh_zl")
    companies = {p.company for p in PEOPLE}
    assert 0.2 * len(companies) <= len(customers) <= 0.4 * len(companies)
    assert seeded.customers == truth.rows["kh_zl"] == len(customers)
    assert len({c[1] for c in customers}) == len(customers), "finance keeps one row per company"
    for nsrsbh, khmc, lxr, lxdh, yx, cs, cjsj, gxsj in customers:
        assert re.fullmatch(r"91\d{6}[0-9A-HJ-NPQRTUWXY]{10}", nsrsbh)
        check = -sum(w * USCC_CHARS.index(c) for w, c in zip(USCC_WEIGHTS, nsrsbh)) % 31
        assert nsrsbh[-1] == USCC_CHARS[check]
        assert nsrsbh == finance.tax_id(khmc) and truth.company_of[nsrsbh] == khmc
        contact = PEOPLE_BY_ID[truth.person_of[nsrsbh]]
        assert contact.company == khmc, "the contact works for the customer"
        assert khmc.startswith(cs)
        assert cjsj <= gxsj < NOW and gxsj >= NOW - timedelta(days=30)
    assert len({finance.tax_id(c) for c in companies}) == len(companies)
    # messy contacts: some names, phones and e-mails are not written the canonical way
    assert any(c[2] != PEOPLE_BY_ID[truth.person_of[c[0]]].name for c in customers)
    assert any(c[3] is None or not re.fullmatch(r"1\d{10}", c[3]) for c in customers)
    assert any(c[4] is None for c in customers) and any(c[4] for c in customers)


def test_every_amount_parses_to_the_truth_exactly(conn, seeded):
    truth = seeded.truth
    invoices = rows(conn, "select fphm, je, se, jshj, bz, zt, kprq, gxsj from cw.fp")
    contracts = rows(conn, "select htbh, htje, bz, zt, qdrq, ksrq, jsrq, gxsj from cw.ht")
    payments = rows(conn, "select skdh, skje, fphm, bz, fkfs, skrq, gxsj from cw.sk")
    assert {t: truth.rows[t] for t in ("fp", "ht", "sk")} == {"fp": len(invoices), "ht": len(contracts),
                                                              "sk": len(payments)}
    assert len(invoices) >= 60 and len(contracts) >= 8 and len(payments) >= 40

    parsed: dict[str, dict[str, dict[str, Decimal]]] = {"fp": {"je": {}, "se": {}, "jshj": {}},
                                                        "ht": {"htje": {}}, "sk": {"skje": {}}}
    for fphm, je, se, jshj, bz, zt, kprq, gxsj in invoices:
        assert isinstance(se, Decimal)
        parsed["fp"]["je"][fphm], parsed["fp"]["se"][fphm], parsed["fp"]["jshj"][fphm] = exact(je), se, exact(jshj)
        assert exact(je) + se == exact(jshj), f"{fphm}: jshj must be je + se exactly"
        assert exact(je) > 0 and se >= 0
        assert bz in {"CNY", "RMB", "人民币", "USD"} and zt in {"0", "1", "2"}
        assert kprq <= gxsj.date() and NOW - timedelta(days=30) <= gxsj < NOW
    for htbh, htje, bz, zt, qdrq, ksrq, jsrq, gxsj in contracts:
        assert re.fullmatch(DECIMAL_COMMA, htje), htje
        parsed["ht"]["htje"][htbh] = exact(htje, decimal_comma=True)
        assert bz in {"CNY", "RMB", "人民币", "USD"} and zt in {"有效", "终止", "草稿"}
        assert qdrq <= ksrq < jsrq and gxsj < NOW
    for skdh, skje, fphm, bz, fkfs, skrq, gxsj in payments:
        parsed["sk"]["skje"][skdh] = exact(skje)
        assert fkfs in {"银行转账", "支票", "现金", "承兑汇票"} and bz in {"CNY", "RMB", "人民币", "USD"}
        assert gxsj < NOW and skrq <= gxsj.date()

    for table, columns in parsed.items():
        for column, values in columns.items():
            assert values == truth.amounts[table][column], f"{table}.{column}"
            for key, value in values.items():
                assert value.as_tuple() == truth.amounts[table][column][key].as_tuple()
            assert sum(values.values()) == truth.sums[table][column], f"{table}.{column}"
    [(se_sum,)] = rows(conn, "select sum(se) from cw.fp")
    assert se_sum == truth.sums["fp"]["se"]
    assert truth.sums["fp"]["je"] + truth.sums["fp"]["se"] == truth.sums["fp"]["jshj"]


def test_every_text_form_occurs_including_float_breaking_values(conn, seeded):
    texts = [t for (t,) in rows(conn, "select je from cw.fp union all select jshj from cw.fp "
                                      "union all select skje from cw.sk")]
    forms = Counter(amount_form(t) for t in texts)
    assert forms["other"] == 0, [t for t in texts if amount_form(t) == "other"][:5]
    assert set(forms) == set(AMOUNT_FORMS), forms
    assert any(parse_money(t).as_tuple().exponent == -1 for t in texts if t[0] in "¥￥"), "¥1,234.5 form"
    assert any(t.startswith("￥") for t in texts) and any(t.startswith("¥") for t in texts)
    refunds = [t for t in texts if t.startswith("(")]
    assert refunds and all(parse_money(t) < 0 for t in refunds)
    assert not any(parse_money(t) < 0 for (t,) in rows(conn, "select je from cw.fp union all select jshj from cw.fp"))
    for text, bz in rows(conn, "select je, bz from cw.fp union all select jshj, bz from cw.fp "
                               "union all select skje, bz from cw.sk"):
        assert not (text.startswith("$") and bz != "USD"), "a dollar sign only on USD rows"
        assert not (re.search("[¥￥元]", text) and bz == "USD"), "yuan marks only on CNY rows"

    for table, column in (("fp", "je"), ("sk", "skje"), ("ht", "htje")):
        values = seeded.truth.amounts[table][column].values()
        lossy = [v for v in values if Decimal(repr(float(v))) != v and len(v.as_tuple().digits) >= 17]
        assert lossy, f"{table}.{column} needs amounts a float cannot hold"
        assert all(v.as_tuple().exponent == -2 for v in values)


def test_orphans_reference_customers_not_yet_keyed_in(conn, seeded):
    truth = seeded.truth
    known = {n for (n,) in rows(conn, "select nsrsbh from cw.kh_zl")}
    assert truth.orphan_tax_ids and not set(truth.orphan_tax_ids) & known
    orphan_invoices = {f for f, n in rows(conn, "select fphm, gmf_nsrsbh from cw.fp") if n not in known}
    orphan_payments = {s for s, n in rows(conn, "select skdh, nsrsbh from cw.sk") if n not in known}
    assert orphan_invoices == set(truth.orphan_invoices) and orphan_invoices
    assert orphan_payments == set(truth.orphan_payments)
    assert 0 < len(orphan_invoices) <= 0.08 * truth.rows["fp"]
    assert len(orphan_payments) <= 0.08 * truth.rows["sk"]
    for nsrsbh in truth.orphan_tax_ids:
        assert truth.company_of[nsrsbh] in {p.company for p in PEOPLE}
        assert PEOPLE_BY_ID[truth.person_of[nsrsbh]].company == truth.company_of[nsrsbh]
    assert {n for (n,) in rows(conn, "select nsrsbh from cw.truth_backlog")} == set(truth.orphan_tax_ids)
    assert not rows(conn, "select 1 from cw.ht where nsrsbh <> all(%s)", (list(known),))


def test_apply_changes_moves_gxsj_into_the_last_hour(conn, seeded):
    later = NOW + timedelta(days=1)
    window = later - timedelta(hours=1)
    before = dump(conn)
    changes = finance.apply_changes(conn, seed=42, now=later, n_updates=10, n_new=5, people=PEOPLE)

    assert set(changes.resolved_orphans) == set(seeded.truth.orphan_tax_ids)
    assert set(changes.resolved_orphans) <= set(changes.new_customers)
    assert len(changes.new_customers) == len(changes.resolved_orphans) + 5
    assert not rows(conn, "select * from cw.truth_backlog")
    assert not rows(conn, "select 1 from cw.fp where gmf_nsrsbh not in (select nsrsbh from cw.kh_zl)")
    assert not rows(conn, "select 1 from cw.sk where nsrsbh not in (select nsrsbh from cw.kh_zl)")
    for name in ("updated_customers", "updated_invoices", "updated_contracts", "updated_payments"):
        assert len(getattr(changes, name)) == 10, name
    assert changes.new_invoices and changes.new_payments

    touched = {
        "kh_zl": set(changes.updated_customers) | set(changes.new_customers),
        "fp": set(changes.updated_invoices) | set(changes.new_invoices),
        "ht": set(changes.updated_contracts),
        "sk": set(changes.updated_payments) | set(changes.new_payments),
    }
    for table, key in TABLES.items():
        recent = rows(conn, f"select {key}, gxsj from cw.{table} where gxsj >= %s", (window,))
        assert {k for k, _ in recent} == touched[table], table
        assert all(window <= gxsj < later for _, gxsj in recent)
        [(newest,)] = rows(conn, f"select max(gxsj) from cw.{table}")
        assert newest < later

    old_people = {p for (p,) in rows(conn, "select person_id from cw.truth where nsrsbh <> all(%s)",
                                     (changes.new_customers,))}
    new = rows(conn, "select t.person_id, t.company, k.khmc from cw.truth t join cw.kh_zl k using (nsrsbh) "
                     "where nsrsbh = any(%s)", (changes.new_customers,))
    assert len(new) == len(changes.new_customers)
    assert all(pid in PEOPLE_BY_ID and company == khmc for pid, company, khmc in new)
    assert {c for _, c, _ in new} & {r[1] for r in before["truth"]} == {
        seeded.truth.company_of[n] for n in changes.resolved_orphans}
    assert old_people

    # old amounts are untouched, new ones are as exact as the seed's
    for fphm, je, se, jshj in rows(conn, "select fphm, je, se, jshj from cw.fp"):
        assert exact(je) + se == exact(jshj)
        if fphm in seeded.truth.amounts["fp"]["je"]:
            assert exact(je) == seeded.truth.amounts["fp"]["je"][fphm]
    for skdh, skje in rows(conn, "select skdh, skje from cw.sk"):
        if skdh in seeded.truth.amounts["sk"]["skje"]:
            assert exact(skje) == seeded.truth.amounts["sk"]["skje"][skdh]
    keys = {t: {r[0] for r in rows(conn, f"select {k} from cw.{t}")} for t, k in TABLES.items()}
    for table, new in (("fp", changes.new_invoices), ("sk", changes.new_payments)):
        assert set(new).isdisjoint(r[0] for r in before[table]) and set(new) <= keys[table]


def test_apply_changes_is_deterministic_and_invents_companies_without_a_pool(conn):
    finance.seed(conn, people=PEOPLE, seed=9, now=NOW)
    seeded_truth = rows(conn, "select * from cw.truth")
    later = NOW + timedelta(days=1)
    first = finance.apply_changes(conn, seed=9, now=later, n_updates=5, n_new=4)
    tables = dump(conn)
    finance.seed(conn, people=PEOPLE, seed=9, now=NOW)
    assert finance.apply_changes(conn, seed=9, now=later, n_updates=5, n_new=4) == first
    assert dump(conn) == tables
    invented = rows(conn, "select person_id, company from cw.truth where nsrsbh = any(%s) and nsrsbh <> all(%s)",
                    (first.new_customers, first.resolved_orphans))
    assert len(invented) == 4 and not {pid for pid, _ in invented} & set(PEOPLE_BY_ID)
    known_before = {company for _, company, _ in seeded_truth}
    assert not {company for _, company in invented} & known_before
