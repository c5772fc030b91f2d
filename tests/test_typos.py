"""Keying errors: the `edits` level, typo-tolerant strong fields, and typos in the evaluation set."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crm_sync.identity import clustering, engine, evalset, features
from crm_sync.identity.settings import SettingsError, load_settings, parse_settings

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["record_id", "name", "phone", "email", "company", "city"]


@pytest.fixture(scope="module")
def settings():
    return load_settings(ROOT / "include" / "match" / "customer.yaml")


def clusters(df, settings):
    res = engine.resolve(df, settings, estimate=False)
    return dict(zip(res.assignments.record_id, res.assignments.cluster_id)), res


def test_edits_level_parses_from_shorthand_and_rejects_misuse():
    s = parse_settings({"fields": [{"name": "ssn", "column": "ssn", "normaliser": "exact",
                                    "comparator": {"type": "exact", "levels": ["exact", {"edits": 2}]}}],
                        "blocking": ["ssn"], "thresholds": {"merge": 0.9, "review": 0.5}}, "x.yaml")
    level = s.fields[0].levels[1]
    assert (level.name, level.when, level.max_edits) == ("edits_2", "edits", 2)
    with pytest.raises(SettingsError, match=r"x\.yaml: fields\[0\].*max_edits"):
        parse_settings({"fields": [{"name": "ssn", "column": "ssn", "normaliser": "exact",
                                    "comparator": {"type": "exact", "levels": [
                                        {"name": "e", "when": "exact", "max_edits": 1}]}}],
                        "blocking": ["ssn"], "thresholds": {"merge": 0.9, "review": 0.5}}, "x.yaml")


def test_edits_counts_transpositions_and_substitutions_not_more():
    s = parse_settings({"prior": 0.01, "fields": [
        {"name": "ssn", "column": "ssn", "normaliser": "exact",
         "comparator": {"type": "exact", "levels": ["exact", {"edits": 1, "m": 0.1, "u": 0.001}]}},
        {"name": "k", "column": "k", "normaliser": "exact", "comparator": {"type": "exact"}}],
        "blocking": ["k"], "thresholds": {"merge": 0.9, "review": 0.5}}, "x.yaml")
    df = pd.DataFrame({"record_id": list("abcd"), "k": ["1"] * 4,
                       "ssn": ["1234567", "1243567", "1234568", "7654321"]})
    res = engine.resolve(df, s, estimate=False)
    level = {(res.record_ids[i], res.record_ids[j]): res.scores.explain(k)["fields"]["ssn"]["level"]
             for k, (i, j) in enumerate(zip(res.scores.i, res.scores.j))}
    assert level[("a", "b")] == "edits_1"      # two digits swapped
    assert level[("a", "c")] == "edits_1"      # one digit mistyped
    assert level[("b", "c")] == "else"         # two edits apart
    assert level[("a", "d")] == "else"


def test_mobile_one_digit_off_merges_the_same_person(settings):
    df = pd.DataFrame([
        ("a", "欧阳思琳", "13800138000", None, "北京华信科技有限公司", "北京"),
        ("b", "欧阳思琳", "+86 138 0013 8006", None, None, "北京"),      # last digit mistyped
        ("c", "欧阳思琳", "13912345678", None, None, "上海"),            # another mobile: no typo
    ], columns=COLUMNS)
    c, res = clusters(df, settings)
    assert c["a"] == c["b"] != c["c"]
    ex = res.assignments.set_index("record_id").loc["b", "explanation"]
    assert ex["fields"]["mobile"]["level"] == "typo" and ex["fields"]["mobile"]["weight"] > 5


def test_a_name_typo_on_the_same_mobile_does_not_split_a_person_but_a_different_name_does(settings):
    df = pd.DataFrame([
        ("a", "Zhang Jianguo", "13800138000", None, None, None),
        ("b", "Zhang Jiangou", "138-0013-8000", None, None, None),    # two letters swapped
        ("c", "李娜", "13800138000", None, None, None),                # a family member's phone
    ], columns=COLUMNS)
    c, res = clusters(df, settings)
    assert c["a"] == c["b"]
    assert c["c"] != c["a"]
    assert set(res.review_pairs.reason) <= {"review_band", "strong:name"}


def test_clustering_treats_agreeing_values_as_one_and_refuses_disagreeing_ones():
    # records 0-1 and 1-2 are merge edges; strong values 0, 1, 2 all differ
    strong = [np.array([0, 1, 2])]
    i, j, p = np.array([0, 1]), np.array([1, 2]), np.array([0.99, 0.98])
    plain = clustering.cluster(3, i, j, p, strong, ["name"])
    assert len(set(plain.root.tolist())) == 3 and [r for _, r in plain.refused] == ["strong:name"] * 2
    agreeing = clustering.cluster(3, i, j, p, strong, ["name"], agrees=np.array([[True], [False]]))
    assert agreeing.root[0] == agreeing.root[1] != agreeing.root[2]
    assert [(e, r) for e, r in agreeing.refused] == [(1, "strong:name")]


def test_two_personal_emails_do_not_keep_one_person_apart(settings):
    # a work and a private mailbox count against a match, but never veto the same mobile + name
    df = pd.DataFrame([
        ("a", "周杰伦", "13800138000", "jielun.zhou@huaxin-tech.com.cn", None, None),
        ("b", "周杰伦", "13800138000", "zjl1979@163.com", None, None),
    ], columns=COLUMNS)
    c, res = clusters(df, settings)
    assert c["a"] == c["b"]
    ex = res.assignments.set_index("record_id").loc["b", "explanation"]
    assert ex["fields"]["email"]["level"] == "conflict" and ex["fields"]["email"]["weight"] < 0


def test_evalset_has_keying_errors_at_about_the_stated_rate():
    df = evalset.generate(3000, seed=11)
    settings = load_settings(ROOT / "include" / "match" / "customer.yaml")
    feats = features.build(df.drop(columns=["person_id"]), settings)
    people = {p.person_id: p for p in evalset.generate_people(3000, 11)}
    mobiles = feats["mobile.mobile"]
    true_mobile = df.person_id.map(lambda pid: "+86" + people[pid].mobile)
    valid = mobiles.notna()
    wrong = (mobiles[valid] != true_mobile[valid]).mean()
    assert 0.005 < wrong < 0.06, wrong
    names = df.name.fillna("")
    true_name = df.person_id.map(lambda pid: people[pid].name)
    plain = names.str.len().between(2, 3) & names.str.match(r"^[\u4e00-\u9fff]+$") & ~names.str.contains("先生|女士|总")
    spelled = true_name[plain].map(lambda n: {n, evalset.to_traditional(n)})
    mistyped = [name not in ok for name, ok in zip(names[plain], spelled)]
    assert 0.005 < np.mean(mistyped) < 0.1
