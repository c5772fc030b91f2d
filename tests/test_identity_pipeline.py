"""Identity through the pipeline stages (no Airflow): resolve -> map -> load against a real master.

The tests of this module share one database and run in order, like the runs of one deployment:
ERP and ticketing runs, a rerun, a second run, steward decisions applied by the next run, and
survivorship with provenance and overrides.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from crm_sync import db, load, mapping, runlog
from crm_sync.config import load_source
from crm_sync.identity import apply as identity_apply
from crm_sync.identity import master
from crm_sync.identity.resolve import resolve
from crm_sync.sources import extract
from crm_sync.watermark import Window

T0 = datetime(2025, 3, 1, tzinfo=timezone.utc)


def ts(day: int, hour: int = 0) -> str:
    return datetime(2025, 3, day, hour, tzinfo=timezone.utc).isoformat()


def erp(no, name, mobile=None, phone=None, email=None, company=None, city=None, day=1):
    return {"customer_no": no, "name": name, "mobile": mobile, "phone": phone, "email": email, "company": company,
            "city": city, "created_at": ts(1), "updated_at": ts(day)}


def user(uid, name, phone=None, email=None, org=None, day=1):
    return {"id": uid, "name": name, "phone": phone, "email": email, "organization": org,
            "created_at": ts(1), "updated_at": ts(day)}


def run(dsn: str, source: str, run_id: str, records: dict[str, list[dict]], *, resolve_only: bool = False):
    """One pipeline run as the DAG does it: extract to staging, resolve, map, load (or stop after resolve)."""
    cfg = load_source(source)
    conn = db.connect(dsn)
    try:
        with conn.cursor() as cur:
            runlog.start(cur, run_id, source, cfg.dag_id, None, None)
        for stream in cfg.streams:
            extract.stage_records(conn, run_id, cfg, stream, Window(None, datetime(2025, 4, 1, tzinfo=timezone.utc)),
                                  [records.get(stream.name, [])])
        conn.commit()
        result = resolve(conn, run_id, cfg)
        conn.commit()
        if resolve_only:
            return result
        for stream in cfg.streams:
            mapping.map_stream(conn, run_id, cfg, stream)
        conn.commit()
        load.load(conn, run_id, cfg)
        return result
    finally:
        conn.close()


def customer_of(cur, source: str, source_id: str) -> str:
    cur.execute("select customer_id::text from crm.customer_link where source = %s and source_id = %s",
                (source, source_id))
    return cur.fetchone()[0]


def customer_ids(cur) -> dict[tuple[str, str], str]:
    cur.execute("select source, source_id, customer_id::text from crm.customer_link")
    return {(s, i): c for s, i, c in cur.fetchall()}


def review_item(cur, a: tuple[str, str], b: tuple[str, str]):
    (sa, ia), (sb, ib) = sorted([a, b])
    cur.execute("""select review_id, status, probability, reason, explanation, customer_a, customer_b
                   from crm.review_item where source_a = %s and source_id_a = %s and source_b = %s
                   and source_id_b = %s""", (sa, ia, sb, ib))
    return cur.fetchone()


ERP_1 = {"customers": [
    erp("C1", "张三", mobile="138 0013 8000", company="北京华信科技有限公司", city="北京"),
    erp("C2", "李娜", email="lina@163.com", company="上海申达贸易有限公司", city="上海"),
    erp("C3", "周杰", phone="0571-88886666", company="杭州星辰科技有限公司", city="杭州"),
    erp("C6", "王先生", mobile="13911112222", city="深圳"),
]}
TICKETING_1 = {"users": [
    user("U1", "Zhang San", phone="+86 13800138000", org="华信科技（北京）有限公司"),
    user("U2", "Li Na", org="上海申达贸易有限公司"),      # same reading and firm: review
    user("U3", "Zhou Jie", org="杭州星辰科技有限公司"),   # same reading and firm, nothing else: review
    user("U6", "王伟", phone="139 1111 2222", email="wangwei@qq.com"),
]}


@pytest.fixture(scope="module")
def dsn(fresh_dsn):
    run(fresh_dsn, "erp", "erp-1", ERP_1)
    run(fresh_dsn, "ticketing", "tk-1", TICKETING_1)
    return fresh_dsn


def test_cross_source_duplicates_end_in_one_customer(dsn, conn):
    with conn.cursor() as cur:
        assert customer_of(cur, "erp", "C1") == customer_of(cur, "ticketing", "U1")
        assert customer_of(cur, "erp", "C6") == customer_of(cur, "ticketing", "U6")
        # different people stay apart
        assert customer_of(cur, "erp", "C1") != customer_of(cur, "erp", "C2")
        # the first customer's id is derived from its smallest record id, so it is stable
        assert customer_of(cur, "erp", "C1") == str(master.new_customer_id("erp/customers/C1"))
        cur.execute("""select decision, match_rule, match_score, explanation from stg.resolved
                       where run_id = 'tk-1' and source_pk = 'U1'""")
        decision, rule, score, explanation = cur.fetchone()
        assert (decision, rule) == ("merged", "engine_match")
        assert float(score) >= 0.99
        assert explanation["matched_record"] == "erp/customers/C1"
        assert "mobile" in explanation["fields"]
        # the master now stores what the next run needs: identity input and blocking keys
        cur.execute("select phone from crm.source_identity where source = 'erp' and source_id = 'C1'")
        assert cur.fetchone()[0] == "138 0013 8000"
        cur.execute("select count(*) from crm.match_key where source = 'erp' and source_id = 'C1' and key like 'b:mobile.value=%'")
        assert cur.fetchone()[0] == 1


def test_review_band_pair_creates_one_review_item(dsn, conn):
    with conn.cursor() as cur:
        item = review_item(cur, ("erp", "C2"), ("ticketing", "U2"))
        assert item is not None
        review_id, status, probability, reason, explanation, ca, cb = item
        assert status == "open" and reason == "review_band"
        assert 0.80 <= float(probability) < 0.95
        assert explanation["fields"]["name"]["level"] in ("exact", "pinyin")
        assert str(ca) == customer_of(cur, "erp", "C2") and str(cb) == customer_of(cur, "ticketing", "U2")
        assert ca != cb
        assert review_item(cur, ("erp", "C3"), ("ticketing", "U3")) is not None
        cur.execute("select ids_review from sync.run_log where run_id = 'tk-1' and source = 'ticketing'")
        assert cur.fetchone()[0] >= 2


def test_rerun_changes_no_id_and_asks_nothing_twice(dsn, conn):
    with conn.cursor() as cur:
        before = customer_ids(cur)
        cur.execute("select count(*) from crm.review_item")
        items = cur.fetchone()[0]
    conn.rollback()
    run(dsn, "ticketing", "tk-1", TICKETING_1)
    run(dsn, "erp", "erp-1", ERP_1)
    with conn.cursor() as cur:
        assert customer_ids(cur) == before
        cur.execute("select count(*) from crm.review_item")
        assert cur.fetchone()[0] == items
        cur.execute("select count(*) from crm.customer")
        assert cur.fetchone()[0] == len(set(before.values()))


def test_second_run_joins_the_existing_customer(dsn, conn):
    with conn.cursor() as cur:
        zhang = customer_of(cur, "erp", "C1")
        cur.execute("select count(*) from crm.review_item")
        items = cur.fetchone()[0]
    conn.rollback()
    # a new ERP record of the same person, and the same ticketing users again (a second hourly run)
    result = run(dsn, "erp", "erp-2", {"customers": [
        erp("C7", "張三先生", mobile="+86 138-0013-8000", email="zhangsan@huaxin.cn", day=2)]})
    assert result.merged == 1 and result.new == 0
    run(dsn, "ticketing", "tk-2", TICKETING_1)
    with conn.cursor() as cur:
        assert customer_of(cur, "erp", "C7") == zhang
        cur.execute("select decision from stg.resolved where run_id = 'erp-2' and source_pk = 'C7'")
        assert cur.fetchone()[0] == "merged"
        cur.execute("select decision, count(*) from stg.resolved where run_id = 'tk-2' group by 1")
        assert dict(cur.fetchall()) == {"linked": 4}
        cur.execute("select count(*) from crm.review_item")
        assert cur.fetchone()[0] == items


def test_survivorship_picks_by_config_with_provenance(dsn, conn):
    with conn.cursor() as cur:
        cur.execute("select full_name, phone_e164, phone_kind, email, company, provenance from crm.customer"
                    " where customer_id = %s", (customer_of(cur, "erp", "C1"),))
        name, phone, kind, email, company, prov = cur.fetchone()
        # 张三 (erp, priority 80) beats Zhang San (ticketing, 40); of the two ERP records the newer wins
        assert name == "张三"
        assert prov["full_name"] == {"source": "erp", "source_id": "C7", "rule": "recency",
                                     "at": prov["full_name"]["at"]}
        assert prov["full_name"]["at"].startswith("2025-03-02")
        # one ERP and one ticketing company: source priority decides
        assert company == "北京华信科技有限公司"
        assert prov["company"]["source"] == "erp" and prov["company"]["rule"] == "source_priority"
        assert (phone, kind) == ("+8613800138000", "mobile")
        assert email == "zhangsan@huaxin.cn" and prov["email"]["rule"] == "only_value"
        # 王先生 (erp) is only a surname: the ticketing full name wins on completeness despite priority
        cur.execute("select full_name, provenance from crm.customer where customer_id = %s",
                    (customer_of(cur, "erp", "C6"),))
        name, prov = cur.fetchone()
        assert name == "王伟"
        assert prov["full_name"] == {**prov["full_name"], "source": "ticketing", "source_id": "U6",
                                     "rule": "completeness"}


def test_override_wins_and_survives_the_next_run(dsn, conn):
    with conn.cursor() as cur:
        cid = customer_of(cur, "erp", "C1")
        identity_apply.set_override(cur, cid, "full_name", "张三丰", by="steward.li")
    conn.commit()
    run(dsn, "erp", "erp-3", {"customers": [erp("C1", "张三", mobile="138 0013 8000", company="北京华信科技有限公司",
                                                city="北京", day=3)]})
    with conn.cursor() as cur:
        cur.execute("select full_name, provenance from crm.customer where customer_id = %s", (cid,))
        name, prov = cur.fetchone()
        assert name == "张三丰"
        assert prov["full_name"]["rule"] == "override" and prov["full_name"]["source_id"] == "steward.li"
        assert prov["company"]["rule"] != "override"


def test_same_decision_merges_on_the_next_run(dsn, conn):
    with conn.cursor() as cur:
        review_id = review_item(cur, ("erp", "C2"), ("ticketing", "U2"))[0]
        c2, u2 = customer_of(cur, "erp", "C2"), customer_of(cur, "ticketing", "U2")
        identity_apply.decide(cur, review_id, "same", by="steward.li", note="same phone call")
    conn.commit()
    # the next run does not even carry either record: the decision is applied anyway
    run(dsn, "ticketing", "tk-3", {"users": [user("U9", "孙悟空", phone="13655556666")]})
    survivor, absorbed = sorted([c2, u2])
    with conn.cursor() as cur:
        assert customer_of(cur, "erp", "C2") == customer_of(cur, "ticketing", "U2") == survivor
        cur.execute("select merged_into::text from crm.customer where customer_id = %s", (absorbed,))
        assert cur.fetchone()[0] == survivor
        cur.execute("select rule, evidence from crm.customer_merge where absorbed = %s and survivor = %s",
                    (absorbed, survivor))
        rule, evidence = cur.fetchone()
        assert rule == "steward" and evidence["review_id"] == review_id
        cur.execute("select count(*) from crm.source_customer where customer_id = %s", (absorbed,))
        assert cur.fetchone()[0] == 0
        cur.execute("select status, applied_run_id from crm.review_item where review_id = %s", (review_id,))
        assert cur.fetchone() == ("same", "tk-3")
        cur.execute("select full_name, email from crm.customer where customer_id = %s", (survivor,))
        assert cur.fetchone() == ("李娜", "lina@163.com")
    # a record of the absorbed customer arriving again lands on the survivor
    run(dsn, "ticketing", "tk-4", {"users": [user("U2", "Li Na", org="上海申达贸易有限公司", day=4)]})
    with conn.cursor() as cur:
        assert customer_of(cur, "ticketing", "U2") == survivor


def test_different_decision_keeps_them_apart_and_is_remembered(dsn, conn):
    with conn.cursor() as cur:
        review_id = review_item(cur, ("erp", "C3"), ("ticketing", "U3"))[0]
        identity_apply.decide(cur, review_id, "different", by="steward.wu")
        c3, u3 = customer_of(cur, "erp", "C3"), customer_of(cur, "ticketing", "U3")
    conn.commit()
    run(dsn, "ticketing", "tk-5", {"users": [user("U3", "Zhou Jie", org="杭州星辰科技有限公司", day=5)]})
    run(dsn, "erp", "erp-5", {"customers": [erp("C3", "周杰", phone="0571-88886666", company="杭州星辰科技有限公司",
                                                city="杭州", day=5)]})
    with conn.cursor() as cur:
        assert (customer_of(cur, "erp", "C3"), customer_of(cur, "ticketing", "U3")) == (c3, u3)
        cur.execute("select count(*) from crm.review_item where (source_id_a, source_id_b) = ('C3', 'U3')")
        assert cur.fetchone()[0] == 1
        cur.execute("select status, applied_run_id from crm.review_item where review_id = %s", (review_id,))
        assert cur.fetchone() == ("different", "tk-5")


def test_different_after_a_merge_splits_the_later_record(dsn, conn):
    with conn.cursor() as cur:
        review_id = review_item(cur, ("erp", "C2"), ("ticketing", "U2"))[0]
        merged = customer_of(cur, "erp", "C2")
        assert customer_of(cur, "ticketing", "U2") == merged
        identity_apply.decide(cur, review_id, "different", by="steward.wu", note="two people called 李娜")
    conn.commit()
    run(dsn, "erp", "erp-6", {"customers": []})
    split_id = str(master.split_customer_id(review_id, "ticketing/users/U2"))
    with conn.cursor() as cur:
        assert customer_of(cur, "erp", "C2") == merged
        assert customer_of(cur, "ticketing", "U2") == split_id
        cur.execute("select match_rule from crm.customer_link where source = 'ticketing' and source_id = 'U2'")
        assert cur.fetchone()[0] == "steward_split"
        cur.execute("select full_name, merged_into from crm.customer where customer_id = %s", (split_id,))
        assert cur.fetchone() == ("Li Na", None)
        cur.execute("select email from crm.customer where customer_id = %s", (merged,))
        assert cur.fetchone()[0] == "lina@163.com"
    # remembered: the ticketing record coming again stays on its own customer, and nobody is asked again
    run(dsn, "ticketing", "tk-7", {"users": [user("U2", "李娜", org="上海申达贸易有限公司", day=7)]})
    with conn.cursor() as cur:
        assert customer_of(cur, "ticketing", "U2") == split_id
        assert customer_of(cur, "erp", "C2") == merged
        cur.execute("select count(*) from crm.review_item where (source_id_a, source_id_b) = ('C2', 'U2')")
        assert cur.fetchone()[0] == 1


def test_every_link_points_at_a_live_customer(dsn, conn):
    with conn.cursor() as cur:
        cur.execute("""select count(*) from crm.customer_link l join crm.customer c using (customer_id)
                       where c.merged_into is not null""")
        assert cur.fetchone()[0] == 0
        cur.execute("""select count(*) from crm.source_customer s join crm.customer_link l using (source, source_id)
                       where s.customer_id <> l.customer_id""")
        assert cur.fetchone()[0] == 0


def test_cli_lists_and_decides_review_items(dsn, conn, monkeypatch, capsys):
    import json

    from crm_sync import cli

    monkeypatch.setenv("CRM_SYNC_DSN", dsn)
    assert cli.main(["review", "list", "--json", "--status", "all"]) == 0
    items = json.loads(capsys.readouterr().out)
    pairs = {(i["source_id_a"], i["source_id_b"]): i for i in items}
    assert pairs[("C3", "U3")]["status"] == "different" and pairs[("C3", "U3")]["decided_by"] == "steward.wu"
    assert "fields" in pairs[("C3", "U3")]["explanation"]
    assert cli.main(["review", "list", "--status", "different"]) == 0
    assert "erp:C3 <-> ticketing:U3" in capsys.readouterr().out
    assert cli.main(["review", "decide", "999999", "same", "--by", "x"]) == 1
    with conn.cursor() as cur:
        cid = customer_of(cur, "erp", "C3")
    conn.rollback()
    assert cli.main(["override", cid, "phone", "0571 8888 6666 转 12", "--by", "steward.li"]) == 0
    with conn.cursor() as cur:
        cur.execute("select phone_e164, phone_kind, provenance->'phone'->>'rule' from crm.customer"
                    " where customer_id = %s", (cid,))
        assert cur.fetchone() == ("+8657188886666", "landline", "override")
    assert cli.main(["override", cid, "email", "not an e-mail", "--by", "steward.li"]) == 1
