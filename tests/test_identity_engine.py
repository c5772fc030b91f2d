"""The identity engine end to end, without a database: settings, features, blocking, scoring,
clustering, incremental resolution, offline CSV matching and the evaluation set."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from crm_sync.identity import blocking, clustering, engine, evalset, features
from crm_sync.identity.offline import OUTPUT_COLUMNS, match_csv
from crm_sync.identity.settings import SettingsError, load_settings, parse_settings

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "include" / "match" / "customer.yaml"
COLUMNS = ["record_id", "name", "phone", "email", "company", "city"]


@pytest.fixture(scope="module")
def settings():
    return load_settings(CONFIG)


def frame(*rows: tuple) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=COLUMNS)


def resolve(df, settings, **kw):
    kw.setdefault("estimate", False)
    return engine.resolve(df, settings, **kw)


def cluster_of(res) -> dict[str, str]:
    return dict(zip(res.assignments.record_id, res.assignments.cluster_id))


ZHANG = frame(
    ("a1", "张三", "13800138000", None, "北京华信科技有限公司", "北京"),
    ("a2", "張三先生", "+86 138 0013 8000", None, None, None),
    ("a3", "Zhang San", "0086-138-0013-8000", "zhangsan@163.com", None, "北京市"),
)


# ------------------------------------------------------------------ known matches and negatives

def test_same_person_in_three_spellings_is_one_cluster(settings):
    res = resolve(ZHANG, settings)
    a = res.assignments.set_index("record_id")
    assert a.cluster_id.nunique() == 1
    assert a.loc["a1", "cluster_id"] == "a1"  # a new cluster is keyed by its smallest record id
    assert set(a.decision) == {"merged"}
    assert (a.probability >= settings.thresholds.merge).all()
    assert res.review_pairs.empty


def test_explanation_lists_every_field_and_adds_up(settings):
    res = resolve(ZHANG, settings)
    names = [f.name for f in settings.fields]
    for ex in res.assignments.explanation:
        assert list(ex["fields"]) == names
        assert ex["fields"]["mobile"]["level"] == "exact"
        counted = sum(v["weight"] for v in ex["fields"].values() if v.get("counted", True))
        assert counted + ex["prior_weight"] == pytest.approx(ex["match_weight"], abs=0.01)
        assert ex["matched_record"] in {"a1", "a2", "a3"}
    surname_only = resolve(frame(("b1", "张先生", "13800138000", None, None, None),
                                 ("b2", "张三", "13800138000", None, None, None)), settings)
    ex = surname_only.assignments.explanation[0]
    assert ex["fields"]["name"]["level"] == "surname_only"
    assert ex["fields"]["email"] == {"level": "missing", "weight": 0.0}


def test_two_different_wang_wei_with_different_mobiles_stay_apart(settings):
    res = resolve(frame(("w1", "王伟", "13911112222", None, "北京华信科技有限公司", "北京"),
                        ("w2", "王伟", "13933334444", None, "北京华信科技有限公司", "北京")), settings)
    a = res.assignments
    assert a.cluster_id.nunique() == 2
    assert set(a.decision) == {"new"}
    pair = res.scores.explain(0)
    assert pair["fields"]["mobile"]["level"] == "conflict" and pair["fields"]["mobile"]["weight"] < 0


def test_colleagues_sharing_switchboard_and_info_mailbox_stay_apart(settings):
    # same surname, so several blocking rules do propose the pair
    res = resolve(frame(
        ("c1", "李娜", "010-87654321转123", "info@huaxin-tech.com.cn", "北京华信科技有限公司", "北京"),
        ("c2", "李强", "010-87654321 ext 456", "info@huaxin-tech.com.cn", "华信科技（北京）有限公司", "北京"),
    ), settings)
    assert res.stats["candidate_pairs"] == 1
    assert res.assignments.cluster_id.nunique() == 2
    assert set(res.assignments.decision) == {"new"}
    ex = res.scores.explain(0)
    # the workplace group counts one agreement, not four
    counted = [f for f, v in ex["fields"].items() if v.get("group") == "workplace" and v["counted"] and v["weight"] > 0]
    assert len(counted) == 1


def test_common_name_weighs_less_than_a_rare_one(settings):
    many = [(f"x{i}", "王伟", f"1391111{i:04d}", None, None, "北京") for i in range(40)]
    df = frame(*many, ("r1", "欧阳思琳", "13700000001", None, None, "北京"),
               ("r2", "欧阳思琳", "13700000002", None, None, "北京"))
    res = resolve(df, settings)
    sc = res.scores
    ids = res.record_ids
    w = {(ids[i], ids[j]): sc.weights[k, 0] for k, (i, j) in enumerate(zip(sc.i, sc.j))}
    assert w[("r1", "r2")] > w[("x0", "x1")] + 3


# ------------------------------------------------------------------ clustering

def test_clustering_refuses_to_chain_through_a_weak_record():
    # 0 = 王伟 (mobile A), 1 = 王先生 (switchboard only), 2 = 王伟 (mobile B)
    mobile = np.array([10, -1, 20])
    name = np.array([5, -1, 5])
    res = clustering.cluster(3, np.array([0, 1]), np.array([1, 2]), np.array([0.999, 0.998]),
                             [name, mobile], ["name", "mobile"])
    assert res.root[0] == res.root[1] != res.root[2]
    assert res.refused == [(1, "strong:mobile")]


def test_engine_weak_record_does_not_glue_two_people(settings):
    # A permissive merge threshold puts the weak record's edges in the merge band on purpose.
    doc = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    doc["thresholds"] = {"merge": 0.05, "review": 0.01}
    loose = parse_settings(doc, "loose.yaml")
    res = resolve(frame(
        ("p1", "王伟", "13911112222", None, "北京华信科技有限公司", "北京"),
        ("p1b", "王伟", "13911112222", None, None, "北京"),
        ("weak", "王先生", "010-87654321", None, "北京华信科技有限公司", "北京"),
        ("p2", "王伟", "13933334444", None, "北京华信科技有限公司", "北京"),
        ("p2b", "王伟", "13933334444", None, None, "北京"),
    ), loose)
    c = cluster_of(res)
    assert c["p1"] == c["p1b"] and c["p2"] == c["p2b"]
    assert c["p1"] != c["p2"]
    assert (res.review_pairs.reason == "strong:mobile").any()


def test_cannot_link_is_respected_and_never_asked_again(settings):
    res = resolve(ZHANG, settings, cannot_link=[("a1", "a3")])
    c = cluster_of(res)
    assert c["a1"] != c["a3"]
    pairs = set(zip(res.review_pairs.record_a, res.review_pairs.record_b))
    assert ("a1", "a3") not in pairs and ("a3", "a1") not in pairs


def test_must_link_joins_records_without_evidence(settings):
    df = frame(("m1", "张三", "13800138000", None, None, None),
               ("m2", "李四", None, "lisi@qq.com", None, None))
    assert cluster_of(resolve(df, settings))["m2"] == "m2"
    res = resolve(df, settings, must_link=[("m1", "m2")])
    a = res.assignments.set_index("record_id")
    assert a.loc["m1", "cluster_id"] == a.loc["m2", "cluster_id"] == "m1"
    assert a.loc["m2", "decision"] == "merged"
    assert a.loc["m2", "explanation"]["rule"] == "must_link"


# ------------------------------------------------------------------ incremental

def master(*rows: tuple) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=COLUMNS + ["cluster_id"])


def test_batch_record_joins_the_existing_master_cluster(settings):
    m = master(("old1", "张三", "13800138000", None, "北京华信科技有限公司", "北京", "C-100"),
               ("old2", "李四", "13900139000", None, None, None, "C-200"))
    batch = frame(("new1", "Zhang San", "+86 138-0013-8000", None, None, None),
                  ("new2", "赵六", "13700137000", None, None, None))
    res = resolve(batch, settings, master_df=m)
    a = res.assignments.set_index("record_id")
    assert list(a.index) == ["new1", "new2"]  # only batch records are assigned
    assert a.loc["new1", "cluster_id"] == "C-100" and a.loc["new1", "decision"] == "merged"
    assert a.loc["new2", "cluster_id"] == "new2" and a.loc["new2", "decision"] == "new"
    assert res.cluster_merges.empty
    # a rerun of the same batch gives the same ids
    assert resolve(batch, settings, master_df=m).assignments.cluster_id.tolist() == a.cluster_id.tolist()


def test_strong_batch_record_bridges_two_master_clusters(settings):
    m = master(("old1", "张三", "13800138000", None, None, None, "C-2"),
               ("old2", "张三", None, "zhangsan@163.com", None, None, "C-1"))
    batch = frame(("new1", "張三", "138 0013 8000", "ZhangSan@163.com", None, None))
    res = resolve(batch, settings, master_df=m)
    assert res.assignments.cluster_id.tolist() == ["C-1"]
    merges = res.cluster_merges
    assert merges[["survivor", "absorbed"]].values.tolist() == [["C-1", "C-2"]]
    assert "new1" in (merges.record_a.iloc[0], merges.record_b.iloc[0])
    assert merges.explanation.iloc[0]["probability"] >= settings.thresholds.merge


def test_master_master_pairs_are_not_compared(settings):
    m = master(("old1", "张三", "13800138000", None, None, None, "C-1"),
               ("old2", "张三", "13800138000", None, None, None, "C-2"))
    res = resolve(frame(("new1", "王五", "13600136000", None, None, None)), settings, master_df=m)
    assert res.stats["candidate_pairs"] == 0 and res.cluster_merges.empty


def test_tf_counts_from_a_big_master_weaken_a_common_value(settings):
    df = frame(("t1", "王伟", "010-87654321", None, None, None),
               ("t2", "王伟", "010-87654321", None, None, None))
    rare = resolve(df, settings, tf_counts={"landline": {"+861087654321": 2}, "total": 1_000_000})
    common = resolve(df, settings, tf_counts={"landline": {"+861087654321": 5000}, "total": 1_000_000})
    # a switchboard 5000 master records share is worth about log2(5000/2) bits less
    assert common.scores.weights[0, 3] < rare.scores.weights[0, 3] - 8
    assert common.scores.explain(0)["fields"]["landline"]["tf_adjusted"] is True


# ------------------------------------------------------------------ blocking

def test_oversized_block_is_skipped_and_counted():
    s = parse_settings({
        "fields": [{"name": "email", "column": "email", "normaliser": "email", "use": "role",
                    "comparator": {"type": "identifier", "levels": ["exact"]}}],
        "blocking": ["email"], "max_block_size": 200, "thresholds": {"merge": 0.9, "review": 0.5},
    }, "t.yaml")
    df = pd.DataFrame({"record_id": [f"r{i}" for i in range(250)], "email": ["info@x.com"] * 250})
    blocks = blocking.candidate_pairs(features.encode(features.build(df, s), s), s)
    assert len(blocks) == 0 and blocks.skipped_blocks["email.value"] == 1
    assert blocks.skipped_records["email.value"] == 250


def test_blocking_pairs_are_unique_and_complete_on_the_evalset(settings):
    df = evalset.generate(150, seed=3)
    enc = features.encode(features.build(df, settings), settings)
    b = blocking.candidate_pairs(enc, settings)
    keys = b.i * len(df) + b.j
    assert (b.i < b.j).all() and len(np.unique(keys)) == len(keys)
    assert blocking.pairs_completeness(b.i, b.j, df.person_id.to_numpy()) > 0.8
    assert blocking.reduction_ratio(len(b), len(df)) > 0.95


# ------------------------------------------------------------------ estimation on the evalset

def test_estimation_learns_sensible_weights_and_resolves_precisely(settings):
    df = evalset.generate(700, seed=5)
    res = engine.resolve(df.drop(columns=["person_id"]), settings, estimate=True, explain=False)
    p = res.params
    w = {f.name: dict(zip(f.level_names, np.log2(p.m[f.name] / p.u[f.name]))) for f in settings.fields}
    assert w["mobile"]["exact"] > 10 and w["mobile"]["conflict"] < 0
    assert w["name"]["else"] < -3 and w["name"]["exact"] > 5
    assert "EM" in p.origin["m"] and "sampling" in p.origin["u"]
    pred = res.assignments.cluster_id.to_numpy()
    truth = df.person_id.to_numpy()
    c = pd.DataFrame({"c": pred, "t": truth})

    def pairs(sizes):
        s = sizes.to_numpy(np.int64)
        return (s * (s - 1) // 2).sum()

    tp, predicted, true = pairs(c.groupby(["c", "t"]).size()), pairs(c.groupby("c").size()), pairs(c.groupby("t").size())
    assert tp / predicted >= 0.99
    assert tp / true >= 0.6


def test_evalset_is_deterministic_and_labelled():
    a, b = evalset.generate(40, seed=9), evalset.generate(40, seed=9)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == evalset.COLUMNS
    assert a.record_id.is_unique and a.person_id.nunique() == 40
    assert set(a.source) <= set(evalset.SOURCES)


# ------------------------------------------------------------------ any column set

def test_western_columns_with_multi_column_name(tmp_path):
    s = parse_settings({
        "prior": 0.01,
        "fields": [
            {"name": "full_name", "columns": ["given_name", "surname"], "normaliser": "text",
             "comparator": {"type": "string"}, "tf_adjust": True},
            {"name": "dob", "column": "date_of_birth", "normaliser": "exact", "comparator": {"type": "exact"},
             "strong": True},
            {"name": "postcode", "column": "postcode", "normaliser": "text", "comparator": {"type": "exact"}},
        ],
        "blocking": ["dob", "full_name.value[:3] + postcode"],
        "thresholds": {"merge": 0.9, "review": 0.5},
    }, "western.yaml")
    df = pd.DataFrame({
        "record_id": ["1", "2", "3"],
        "given_name": ["John", "Jon", "Mary"], "surname": ["Smith", " SMITH", "Smith"],
        "date_of_birth": ["1980-01-02", "1980-01-02", "1975-05-05"],
        "postcode": ["SW1A 1AA", "sw1a 1aa", "SW1A 1AA"],
    })
    res = engine.resolve(df, s, estimate=False)
    c = cluster_of(res)
    assert c["1"] == c["2"] != c["3"]
    assert res.assignments.set_index("record_id").loc["2", "explanation"]["fields"]["full_name"]["level"] \
        == "jaro_winkler_0.92"


# ------------------------------------------------------------------ offline match

def test_match_csv_end_to_end(tmp_path):
    df = evalset.generate(60, seed=4).drop(columns=["person_id", "source"])
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    df.to_csv(src, index=False)
    summary = match_csv(CONFIG, src, out)
    result = pd.read_csv(out, dtype={"record_id": str, "cluster_id": str, "decision": str})
    assert list(result.columns) == OUTPUT_COLUMNS
    assert result.record_id.tolist() == df.record_id.tolist()
    assert set(result.decision) <= {"merged", "review", "new"} and "merged" in set(result.decision)
    sizes = result.groupby("cluster_id").record_id.transform("size")
    assert (result.decision[sizes > 1] == "merged").all()
    assert (result.decision[sizes == 1] != "merged").all()
    assert result.score.between(0, 1).all() and (result.score[result.decision == "new"] == 0).all()
    assert f"{len(df)} records" in summary and str(out) in summary


def test_match_csv_errors_name_file_and_column(tmp_path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"id": ["1"], "name": ["张三"]}).to_csv(src, index=False)
    with pytest.raises(SettingsError, match=r"in\.csv.*'record_id'"):
        match_csv(CONFIG, src, tmp_path / "out.csv")
    pd.DataFrame({"record_id": ["1"], "name": ["张三"], "phone": ["1"], "email": [""], "city": [""]}).to_csv(
        src, index=False)
    with pytest.raises(SettingsError, match=r"in\.csv.*\['company'\]"):
        match_csv(CONFIG, src, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


# ------------------------------------------------------------------ settings

@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["fields"][0].update(normaliser="nickname"), r"fields\[0\] \(name\)\.normaliser"),
    (lambda d: d["fields"][1]["comparator"].update(levels=["pinyin"]),
     r"fields\[1\] \(mobile\).*predicate 'pinyin'"),
    (lambda d: d["blocking"].append("nosuch.pinyin"), r"blocking.*unknown field 'nosuch'"),
    (lambda d: d["blocking"].append("mobile.pinyin"), r"'mobile' \(phone\) has no attribute 'pinyin'"),
    (lambda d: d.update(thresholds={"merge": 0.5, "review": 0.9}), r"thresholds.*must not exceed"),
    (lambda d: d["fields"][2].pop("column"), r"fields\[2\] \(email\).*exactly one of 'column' or 'columns'"),
    (lambda d: d["fields"][0]["comparator"]["levels"].append({"jaro_winkler": 1.5}),
     r"fields\[0\] \(name\)\.comparator\.levels\[4\]\.threshold"),
])
def test_settings_errors_name_the_file_and_field(mutate, expected):
    doc = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    mutate(doc)
    with pytest.raises(SettingsError) as err:
        parse_settings(doc, "bad.yaml")
    assert str(err.value).startswith("bad.yaml: ")
    assert pytest.importorskip("re").search(expected, str(err.value)), str(err.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(SettingsError, match="nope.yaml: match config not found"):
        load_settings(tmp_path / "nope.yaml")


# ------------------------------------------------------------------ qualifiers: place and extension

def test_same_trade_name_in_two_named_cities_is_not_company_evidence(settings):
    res = resolve(frame(
        ("k1", "刘平", None, "ping.liu@dongfang-consulting.com.cn", "南京东方咨询有限公司", None),
        ("k2", "刘平", "(023)87345511 ext 283", None, "重慶東方諮詢有限公司", "重庆"),
        ("k3", "刘平", None, None, "东方咨询（南京）有限公司", None),
    ), settings)
    levels = {(res.record_ids[i], res.record_ids[j]): res.scores.explain(k)["fields"]["company"]
              for k, (i, j) in enumerate(zip(res.scores.i, res.scores.j))}
    assert levels[("k1", "k2")]["level"] == "other_place" and levels[("k1", "k2")]["weight"] <= 0
    assert levels[("k1", "k3")]["level"] == "same_place" and levels[("k1", "k3")]["weight"] > 5
    c = cluster_of(res)
    assert c["k1"] != c["k2"]


def test_switchboard_extension_tells_a_desk_from_a_colleague(settings):
    res = resolve(frame(
        ("d1", "王先生", "021-52173395-299", None, None, None),
        ("d2", "王伟", "(021)5217 3395转299", None, None, None),
        ("d3", "王磊", "021-52173395 ext 301", None, None, None),
    ), settings)
    ex = {(res.record_ids[i], res.record_ids[j]): res.scores.explain(k)["fields"]["landline"]
          for k, (i, j) in enumerate(zip(res.scores.i, res.scores.j))}
    assert ex[("d1", "d2")]["level"] == "desk"
    assert ex[("d1", "d3")]["level"] == "other_extension" and ex[("d1", "d3")]["weight"] <= 0
    assert ex[("d1", "d2")]["weight"] > ex[("d1", "d3")]["weight"] + 10


def test_estimated_disagreement_levels_never_count_for_a_match(settings):
    from crm_sync.identity import scoring

    params = scoring.Params.from_settings(settings)
    landline = settings.field("landline")
    k = landline.level_names.index("other_extension")
    params.m["landline"] = np.array([0.2, 0.3, 0.45, 0.05])
    params.u["landline"] = np.array([1e-5, 1e-4, 5e-4, 0.9994])
    capped = scoring.cap_disagreements(params, settings)
    assert capped.m["landline"][k] == pytest.approx(1e-4)
    assert capped.m["landline"].sum() == pytest.approx(1.0)
    # the excess goes to the other levels in proportion: desk still weighs more than exact
    assert capped.m["landline"][0] / capped.m["landline"][2] == pytest.approx(0.2 / 0.45)


# ------------------------------------------------------------------ scale: same results, fewer bytes

def test_fast_clustering_matches_best_first_union_find_on_random_graphs():
    rng = np.random.default_rng(11)
    for trial in range(30):
        n = 60
        m = 90
        ei, ej = rng.integers(0, n, m), rng.integers(0, n, m)
        keep = ei != ej
        ei, ej = np.minimum(ei, ej)[keep], np.maximum(ei, ej)[keep]
        p = rng.choice([0.991, 0.995, 0.999], len(ei))
        strong = [np.where(rng.random(n) < 0.5, rng.integers(0, 4, n), -1) for _ in range(2)]
        initial = np.where(rng.random(n) < 0.2, rng.integers(0, 3, n), -1)
        existing = [f"C{g}" if g >= 0 else None for g in initial]
        cannot = [(int(a), int(b)) for a, b in rng.integers(0, n, (2, 2)) if a != b]
        fast = clustering.cluster(n, ei, ej, p, strong, ["a", "b"], cannot_link=cannot,
                                  initial=initial, existing=existing)
        slow = clustering._cluster_best_first(n, ei, ej, p, strong, ["a", "b"], cannot_link=cannot,
                                              initial=initial, existing=existing)
        same = pd.crosstab(fast.root, slow.root)
        assert ((same > 0).sum(axis=1) == 1).all() and ((same > 0).sum(axis=0) == 1).all(), trial
        assert sorted(fast.refused) == sorted(slow.refused)
        assert sorted((sorted(a), sorted(b)) for a, b, _ in fast.joins) == \
            sorted((sorted(a), sorted(b)) for a, b, _ in slow.joins)


def test_candidate_pairs_match_a_brute_force_reference_and_keep_the_first_rule(settings):
    df = evalset.generate(120, seed=8)
    enc = features.encode(features.build(df, settings), settings)
    got = blocking.candidate_pairs(enc, settings)
    expected: dict[tuple[int, int], int] = {}
    for r, rule in enumerate(settings.blocking):
        key = blocking._key_codes(enc, rule)
        cap = rule.max_block_size or settings.max_block_size
        sizes = pd.Series(key[key >= 0]).value_counts()
        for a in range(len(df)):
            for b in range(a + 1, len(df)):
                if key[a] >= 0 and key[a] == key[b] and sizes[key[a]] <= cap:
                    expected.setdefault((a, b), r)
    assert dict(zip(zip(got.i.tolist(), got.j.tolist()), got.rule.tolist())) == expected


def test_encode_reads_several_frames_as_one_and_only_used_attributes(settings):
    df = evalset.generate(50, seed=2)
    feats = features.build(df, settings)
    whole = features.encode(feats, settings)
    split = features.encode([feats.iloc[:20], feats.iloc[20:]], settings)
    assert whole.n == split.n == len(df)
    for col, codes in whole.codes.items():
        np.testing.assert_array_equal(whole.uniques[col][codes], split.uniques[col][split.codes[col]])
    assert "company.pinyin" in whole.codes and "landline.desk" in whole.codes
    assert "email.domain" not in whole.codes  # no level or key reads it


def test_batch_explanations_equal_single_ones(settings):
    df = evalset.generate(60, seed=6).drop(columns=["person_id"])
    res = engine.resolve(df, settings, estimate=False)
    rows = np.arange(min(25, len(res.scores)))
    many = res.scores.explain_many(rows)
    assert many == [res.scores.explain(int(k)) for k in rows]
    for k, ex in zip(rows, many):
        counted = sum(v["weight"] for v in ex["fields"].values() if v.get("counted", True))
        assert counted + ex["prior_weight"] == pytest.approx(ex["match_weight"], abs=0.02)
        assert res.scores.weights[k].sum() == pytest.approx(
            sum(v["weight"] for v in ex["fields"].values()), abs=0.02)
