"""The record columns the resolve stage writes to stg.resolved come from the engine's own features (each
value normalised once) and say what normalising each record on its own says: the phone of the best field
and that field's text, the e-mail as the source wrote it when it does not parse, the name's reading."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from crm_sync import db, runlog
from crm_sync.config import load_source
from crm_sync.identity import normalize
from crm_sync.identity.resolve import resolve
from crm_sync.sources import extract
from crm_sync.watermark import Window

pytestmark = pytest.mark.integration

TS = datetime(2025, 3, 1, tzinfo=timezone.utc).isoformat()


def erp(no, name, mobile=None, phone=None, email=None, company=None, city=None):
    return {"customer_no": no, "name": name, "mobile": mobile, "phone": phone, "email": email, "company": company,
            "city": city, "created_at": TS, "updated_at": TS}


CUSTOMERS = [
    erp("R1", "张三", mobile="138 0013 8000", phone="010-87654321", city="北京"),     # mobile beats landline
    erp("R2", "李娜", mobile="12345", phone="87654321转12", city="上海"),             # invalid vs local landline
    erp("R3", "王先生", mobile="无", phone=" 0571-88886666 ", city="杭州"),           # a null word, then a landline
    erp("R4", "Zhou Jie", mobile="无", email="not-an-email", city="杭州"),            # nothing valid at all
    erp("R5", "陈静", mobile="13900001111 / 13900002222", email=" Chen.Jing@QQ.com "),  # two numbers in one field
    erp("R6", {"first": "x"}, mobile=True, phone="１３８００１３８０００", email=["a@b.cn"]),  # odd shapes, full-width
    erp("R7", None),
]


def expected(c: dict) -> dict:
    """What normalising the record on its own gives (the stage's behaviour before issue 11)."""
    def text(v):
        if v is None or isinstance(v, (dict, list, tuple, bool)):
            return None
        return str(v).strip() or None

    best = (99, None, None)
    for field in ("mobile", "phone"):
        if text(c[field]) is None:
            continue
        p = normalize.normalize_phone(str(c[field]), city=text(c["city"]))
        rank = {"mobile": 0, "landline": 1, "other": 2, "invalid": 3}.get(p.kind, 4)
        if rank < best[0]:
            best = (rank, str(c[field]), p)
    name = normalize.normalize_person_name(text(c["name"]))
    email = normalize.normalize_email(text(c["email"]))
    phone = best[2]
    return {"full_name": name.full or None, "name_key": name.pinyin or None, "phone_raw": best[1],
            "phone_e164": phone.e164 if phone else None, "phone_kind": phone.kind if phone else "empty",
            "phone_ext": phone.extension if phone else None,
            "email": email.email if email.email else (normalize.nfkc(email.raw) or None), "email_valid": email.valid}


@pytest.fixture(scope="module")
def staged(fresh_dsn):
    cfg = load_source("erp")
    conn = db.connect(fresh_dsn)
    try:
        for run_id, customers in (("erp-r1", CUSTOMERS), ("erp-r0", [])):
            with conn.cursor() as cur:
                runlog.start(cur, run_id, "erp", cfg.dag_id, None, None)
            window = Window(None, datetime(2025, 4, 1, tzinfo=timezone.utc))
            for stream in cfg.streams:
                extract.stage_records(conn, run_id, cfg, stream, window,
                                      [customers if stream.name == "customers" else []])
            conn.commit()
        results = {run_id: resolve(conn, run_id, cfg) for run_id in ("erp-r1", "erp-r0")}
        conn.commit()
    finally:
        conn.close()
    return results


def test_record_columns_match_normalising_each_record(staged, conn):
    assert staged["erp-r1"].records == len(CUSTOMERS)
    columns = list(expected(CUSTOMERS[0]))
    with conn.cursor() as cur:
        cur.execute(f"select source_pk, {', '.join(columns)} from stg.resolved where run_id = 'erp-r1'")
        got = {row[0]: dict(zip(columns, row[1:])) for row in cur.fetchall()}
    for c in CUSTOMERS:
        assert got[c["customer_no"]] == expected(c), c["customer_no"]
    # spot checks, so that a wrong `expected` cannot hide a wrong stage
    assert got["R1"]["phone_raw"] == "138 0013 8000" and got["R1"]["phone_kind"] == "mobile"
    assert got["R2"]["phone_raw"] == "87654321转12" and got["R2"]["phone_ext"] == "12"
    assert got["R3"]["phone_kind"] == "landline" and got["R3"]["phone_raw"] == " 0571-88886666 "
    assert got["R4"]["phone_kind"] == "empty" and got["R4"]["email"] == "not-an-email"
    assert got["R4"]["email_valid"] is False
    assert got["R6"]["full_name"] is None and got["R6"]["phone_e164"] == "+8613800138000"
    assert got["R7"] == {**expected(CUSTOMERS[-1]), "phone_kind": "empty"}


def test_identity_input_keeps_the_values_as_read(staged, conn):
    with conn.cursor() as cur:
        cur.execute("""select source_pk, name, phone, email, company, city from stg.identity_input
                       where run_id = 'erp-r1' order by source_pk""")
        rows = {r[0]: r[1:] for r in cur.fetchall()}
    assert rows["R1"] == ("张三", "138 0013 8000 / 010-87654321", None, None, "北京")
    assert rows["R3"] == ("王先生", "无 / 0571-88886666", None, None, "杭州")
    assert rows["R6"] == (None, "１３８００１３８０００", None, None, None)
    assert rows["R7"] == (None, None, None, None, None)


def test_a_run_without_customer_records_resolves_nothing(staged, conn):
    assert staged["erp-r0"].records == 0
    with conn.cursor() as cur:
        cur.execute("select count(*) from stg.resolved where run_id = 'erp-r0'")
        assert cur.fetchone()[0] == 0


@pytest.mark.parametrize("rid", ["erp/customers/C1", "im/contacts/张三 ✓", "x/y/" + "9" * 10_000, ""])
def test_a_new_customers_id_text_is_the_uuid5_of_its_record(rid):
    """The resolve stage names new customers with `new_customer_id_text` (no UUID object per cluster):
    the very id `new_customer_id` gives, so ids already stored and later runs agree."""
    import uuid

    from crm_sync.identity import master

    text = master.new_customer_id_text(rid)
    assert text == str(master.new_customer_id(rid)) == str(uuid.uuid5(master.NAMESPACE, rid))
    assert uuid.UUID(text).version == 5


def test_match_keys_are_staged_whole_whatever_the_slice(staged, conn, fresh_dsn, monkeypatch):
    """stg.match_key is written a slice of records at a time, each record's keys together: slices of two
    records give the rows one slice gives, every key with its own record."""
    from crm_sync.identity import resolve as stage

    cfg = load_source("erp")
    monkeypatch.setattr(stage, "KEY_SLICE", 2)
    own = db.connect(fresh_dsn)
    try:
        with own.cursor() as cur:
            runlog.start(cur, "erp-r2", "erp", cfg.dag_id, None, None)
        window = Window(None, datetime(2025, 4, 1, tzinfo=timezone.utc))
        for stream in cfg.streams:
            extract.stage_records(own, "erp-r2", cfg, stream, window,
                                  [CUSTOMERS if stream.name == "customers" else []])
        own.commit()
        resolve(own, "erp-r2", cfg)
        own.commit()
    finally:
        own.close()
    with conn.cursor() as cur:
        cur.execute("select run_id, source_pk, key from stg.match_key where run_id in ('erp-r1', 'erp-r2')")
        rows = cur.fetchall()
    whole = {(pk, key) for run, pk, key in rows if run == "erp-r1"}
    sliced = [(pk, key) for run, pk, key in rows if run == "erp-r2"]
    assert len(sliced) == len(set(sliced)) and set(sliced) == whole
    # a key names its own record's values: R1's mobile, R5's first number
    assert ("R1", "b:mobile.value=+8613800138000") in whole
    assert {pk for pk, key in whole if "+8613900001111" in key} == {"R5"}


def test_explanations_are_json_text_with_numpy_values_plain():
    import json
    import math

    import numpy as np

    from crm_sync.identity.resolve import _json

    value = {"fields": {"name": {"level": "exact", "weight": np.float64(8.654), "tf_adjusted": np.bool_(True)}},
             "probability": np.float32(0.5), "pairs": np.array([1, 2]), "n": np.int64(3), "who": "張三先生",
             "score": 4e-05, "odd": math.nan, 7: None, "when": datetime(2025, 3, 1, tzinfo=timezone.utc)}
    text = _json(value)
    assert "張三先生" in text and " " not in text   # UTF-8, compact
    assert json.loads(text) == {
        "fields": {"name": {"level": "exact", "weight": 8.654, "tf_adjusted": True}}, "probability": 0.5,
        "pairs": [1, 2], "n": 3, "who": "張三先生", "score": 4e-05, "odd": None, "7": None,
        "when": "2025-03-01T00:00:00Z"}   # a datetime as RFC 3339 text
    assert list(json.loads(text)) == [k if isinstance(k, str) else str(k) for k in value]   # keys in order
