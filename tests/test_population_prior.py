"""Without estimation the prior shrinks with the population (`matches_per_record`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crm_sync.identity import engine
from crm_sync.identity.settings import load_settings, parse_settings

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["record_id", "name", "phone", "email", "company", "city"]


def test_prior_for_is_capped_by_the_configured_prior():
    doc = {"fields": [{"name": "k", "column": "k", "normaliser": "exact", "comparator": {"type": "exact"}}],
           "blocking": ["k"], "thresholds": {"merge": 0.9, "review": 0.5}}
    s = parse_settings({**doc, "prior": 0.001, "matches_per_record": 2.0})
    assert s.prior_for(101) == pytest.approx(0.001)           # small input: the configured prior
    assert s.prior_for(20_001) == pytest.approx(2.0 / 20_000)  # big input: scaled down
    assert parse_settings({**doc, "prior": 0.001}).prior_for(10**6) == 0.001  # no scaling asked for


def _master(n: int) -> pd.DataFrame:
    # n distinct people with unique names and mobiles, none of them 欧阳思琳
    idx = np.arange(n)
    return pd.DataFrame({
        "record_id": [f"m{i}" for i in idx], "cluster_id": [f"C{i}" for i in idx],
        "name": [f"客户{i}" for i in idx], "phone": [f"139{i:08d}" for i in idx],
        "email": None, "company": None, "city": "上海",
    })


def test_a_rare_name_and_a_city_alone_do_not_merge_against_a_big_master():
    settings = load_settings(ROOT / "include" / "match" / "customer.yaml")
    master = _master(60_000)
    master.loc[0, ["name", "city"]] = ["欧阳思琳", "北京"]
    batch = pd.DataFrame([("b1", "欧阳思琳", None, None, None, "北京")], columns=COLUMNS)
    fixed = settings.model_copy(update={"matches_per_record": None})
    scaled = engine.resolve(batch, settings, master_df=master, estimate=False)
    unscaled = engine.resolve(batch, fixed, master_df=master, estimate=False)
    assert scaled.params.prior == pytest.approx(settings.matches_per_record / len(master))
    assert "matches_per_record" in scaled.params.origin["prior"]
    # a prior taken from a 20k sample makes the one other 欧阳思琳 in 60k records a merge ...
    assert unscaled.assignments.decision[0] == "merged"
    # ... the population's own prior leaves it to a steward
    assert scaled.assignments.decision[0] == "review" and scaled.assignments.cluster_id[0] == "b1"
    assert scaled.assignments.probability[0] < settings.thresholds.merge


def test_small_inputs_keep_the_configured_prior():
    settings = load_settings(ROOT / "include" / "match" / "customer.yaml")
    batch = pd.DataFrame([("b1", "欧阳思琳", None, None, None, "北京")], columns=COLUMNS)
    res = engine.resolve(batch, settings, master_df=_master(50), estimate=False)
    assert res.params.prior == pytest.approx(settings.prior)
