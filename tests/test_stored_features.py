"""The master's match features are stored with the identity input (migration 0014) and read back by
later runs instead of normalising every master candidate again: the same data must resolve the same
way whether a candidate's features come from storage or are rebuilt."""
from __future__ import annotations

import logging

import pandas as pd

from crm_sync import db
from crm_sync.identity import features
from crm_sync.identity.resolve import match_settings
from tests.test_identity_pipeline import ERP_1, TICKETING_1, erp, run

SAMPLE = pd.DataFrame({
    "record_id": [f"r{i}" for i in range(6)],
    "name": ["张三", "張三先生", None, "Li Wei", "王先生", "  "],
    "phone": ["+86 138 0013 8000", "010-87654321转123", "0086-13800138000", None, "13911112222 / 021-5555 6666", ""],
    "email": ["zs@qq.com", "info@acme.cn", None, "bad@", "WangWei@QQ.com", None],
    "company": ["北京某某科技有限公司", None, "ACME Ltd", None, "华信科技（北京）有限公司", None],
    "city": ["北京", "上海", None, None, "深圳", None],
})


def test_stored_features_read_back_as_built():
    settings = match_settings()
    built = features.build(SAMPLE, settings, workers=1)
    stored = features.stored_features(built, settings)
    assert all(isinstance(s, str) for s in stored)
    back = features.from_stored(stored, settings)
    assert list(back.columns) == features.engine_columns(settings)
    for column in features.engine_columns(settings):
        assert back[column].equals(built[column]), column


def test_a_value_holding_the_separator_is_not_stored():
    settings = match_settings()
    built = features.build(SAMPLE, settings, workers=1)
    built.loc[1, "name.value"] = "张\x1f三"
    stored = features.stored_features(built, settings)
    assert stored[1] is None and stored[0] is not None and stored[2] is not None


def test_the_version_follows_the_config():
    settings = match_settings()
    other = settings.model_copy(update={"blocking": settings.blocking[:-1]})
    assert features.match_version(settings) == features.match_version(match_settings())
    assert features.match_version(other) != features.match_version(settings)


def _resolve_only(dsn: str, source: str, run_id: str, records: dict) -> None:
    run(dsn, source, run_id, records, resolve_only=True)


def _resolved(cur, run_id: str) -> dict:
    cur.execute("""select source_pk, customer_id::text, decision, match_rule, match_score
                   from stg.resolved where run_id = %s order by source_pk""", (run_id,))
    return {row[0]: row[1:] for row in cur.fetchall()}


def test_candidates_resolve_the_same_from_stored_or_rebuilt_features(fresh_dsn, caplog):
    version = features.match_version(match_settings())
    run(fresh_dsn, "erp", "erp-1", ERP_1)
    conn = db.connect(fresh_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("select count(*), count(*) filter (where match_version = %s and match_features is not null)"
                        " from crm.source_identity where source = 'erp'", (version,))
            assert cur.fetchone() == (4, 4)

        with caplog.at_level(logging.INFO, logger="crm_sync.identity.resolve"):
            _resolve_only(fresh_dsn, "ticketing", "tk-warm", TICKETING_1)
        warm_log = [r.getMessage() for r in caplog.records if "with stored features" in r.getMessage()]
        assert warm_log and ", 0 normalised in this run" in warm_log[-1], warm_log

        with conn.cursor() as cur:
            cur.execute("update crm.source_identity set match_features = null")
        conn.commit()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="crm_sync.identity.resolve"):
            _resolve_only(fresh_dsn, "ticketing", "tk-cold", TICKETING_1)
        cold_log = [r.getMessage() for r in caplog.records if "with stored features" in r.getMessage()]
        assert cold_log and " 0 with stored features" in cold_log[-1], cold_log

        with conn.cursor() as cur:
            warm, cold = _resolved(cur, "tk-warm"), _resolved(cur, "tk-cold")
        assert warm == cold
        assert warm["U1"][1] == "merged"       # the pair the stored features must still find
    finally:
        conn.close()


def test_a_record_stored_under_another_version_is_stored_again_by_its_next_load(fresh_dsn):
    run(fresh_dsn, "erp", "erp-1", ERP_1)
    conn = db.connect(fresh_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("update crm.source_identity set match_version = 'older', match_features = 'stale'"
                        " where source_id = 'C1'")
            cur.execute("select count(*) from crm.match_key where source_id = 'C1'")
            keys_before = cur.fetchone()[0]
        conn.commit()
        run(fresh_dsn, "erp", "erp-2", {"customers": ERP_1["customers"] + [erp("C9", "赵六", day=2)]})
        with conn.cursor() as cur:
            cur.execute("select match_version, match_features, loaded_run_id from crm.source_identity"
                        " where source_id = 'C1'")
            stored_version, stored, loaded_by = cur.fetchone()
            cur.execute("select count(*) from crm.match_key where source_id = 'C1'")
            keys_after = cur.fetchone()[0]
            cur.execute("select loaded_run_id from crm.source_identity where source_id = 'C2'")
            untouched = cur.fetchone()[0]
        assert stored_version == features.match_version(match_settings())
        assert stored != "stale" and loaded_by == "erp-2"
        assert keys_after == keys_before > 0
        assert untouched == "erp-1"            # an unchanged record of the current version is not rewritten
    finally:
        conn.close()


def test_term_counts_of_a_column_with_its_own_blocking_key_are_read_from_that_key(fresh_dsn):
    """'mobile.value' is both a term column and a whole blocking key: the master stores its values once
    (as 'b:' keys), and term frequencies count those."""
    from crm_sync.identity import master
    from crm_sync.identity.resolve import term_aliases

    settings = match_settings()
    aliases = term_aliases(settings)
    assert aliases.get("mobile.value") == "mobile.value" and "name.value" not in aliases.values()
    run(fresh_dsn, "erp", "erp-1", ERP_1 | {"customers": ERP_1["customers"] + [erp("C7", "张三丰", mobile="13800138000")]})
    _resolve_only(fresh_dsn, "ticketing", "tk-terms", TICKETING_1)
    conn = db.connect(fresh_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("select count(*) from crm.match_key where key like 't:mobile.value=%'")
            assert cur.fetchone()[0] == 0
            cur.execute("select count(*) from crm.match_key where key like 't:name.value=%'")
            assert cur.fetchone()[0] >= 5                     # an unaliased term column keeps its keys
            counts = master.term_counts(cur, "tk-terms", "ticketing", 4, aliases)
    finally:
        conn.close()
    assert counts["mobile.value"]["+8613800138000"] == 2      # C1 and C7
    assert counts["total"] >= 5


def test_decided_pairs_are_found_the_same_whether_read_whole_or_looked_up_by_record(fresh_dsn):
    """`master._decided_items` reads every decided review item when they are no more than the records
    to check, and looks them up per record otherwise: both must find the same decisions."""
    from crm_sync.identity import apply as identity_apply
    from crm_sync.identity import master

    run(fresh_dsn, "erp", "erp-1", ERP_1)
    run(fresh_dsn, "ticketing", "tk-1", TICKETING_1)
    conn = db.connect(fresh_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("""select review_id, source_a, source_id_a, source_b, source_id_b from crm.review_item
                           where status = 'open' order by review_id""")
            items = cur.fetchall()
            assert len(items) >= 2
            identity_apply.decide(cur, items[0][0], "same", "ops.chen")
            identity_apply.decide(cur, items[1][0], "different", "ops.chen")
            one = [(items[0][1], items[0][2])]                      # 1 record, 2 decided items: per record
            padded = one + [("nowhere", "1"), ("nowhere", "2")]     # 3 records: all decided items read
            keyed, whole = master.decisions(cur, one), master.decisions(cur, padded)
            partners = master.decided_partners(cur, one), master.decided_partners(cur, padded)
        conn.rollback()
    finally:
        conn.close()
    assert keyed == whole
    must, cannot = keyed
    assert len(must) == 1 and not cannot
    assert partners[0] == partners[1] == [(items[0][3], items[0][4])]
