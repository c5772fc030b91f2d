"""The engine on Western person records, driven by `include/match/febrl.yaml` alone.

No network: a small FEBRL-like population (given name, surname, address, date of birth, social
security id) is generated here, with typed-wrong duplicates, and resolved with estimated
parameters exactly as `crm-sync match` does.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crm_sync.cli import main
from crm_sync.identity import engine, features, scoring
from crm_sync.identity.settings import load_settings, parse_settings

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "include" / "match" / "febrl.yaml"
COLUMNS = ["record_id", "given_name", "surname", "street_number", "address_1", "address_2", "suburb",
           "postcode", "state", "date_of_birth", "soc_sec_id"]

GIVEN = ("james john robert michael william david richard joseph thomas charles mary patricia jennifer "
         "linda elizabeth barbara susan jessica sarah karen olivia emily chloe jack noah liam ethan lucy "
         "grace ruby sophie zoe mia ella hannah isaac oscar harry leo max lily").split()
SURNAMES = ("smith jones williams brown wilson taylor johnson white martin anderson thompson nguyen "
            "thomas walker harris lee ryan robinson kelly king davis wright evans roberts green hall "
            "wood jackson clarke campbell mitchell hughes edwards turner morris cooper ward watson "
            "murphy bennett").split()
STREETS = ("george street|king street|queen street|church street|high street|station road|park avenue|"
           "victoria road|albert street|william street|elizabeth street|bridge road|railway parade|"
           "mill lane|hill street").split("|")
PLACES = ("rosedale|the grange|ashfield house|kirribilli|northgate|westbury|the pines|"
          "riverview|oakleigh|lakeside").split("|")
SUBURBS = ("parramatta|chatswood|toowong|fremantle|glenelg|sandy bay|fitzroy|manly|bondi|newtown|"
           "subiaco|kew|brunswick|coogee|hawthorn").split("|")
STATES = ("nsw", "vic", "qld", "wa", "sa", "tas", "act")


def _typo(rng: np.random.Generator, text: str, alphabet: str) -> str:
    """One substitution, deletion, insertion or transposition of adjacent characters."""
    if len(text) < 2:
        return text + rng.choice(list(alphabet))
    k = int(rng.integers(0, len(text) - 1))
    kind = rng.integers(0, 4)
    if kind == 0:
        return text[:k] + rng.choice([c for c in alphabet if c != text[k]]) + text[k + 1:]
    if kind == 1:
        return text[:k] + text[k + 1:]
    if kind == 2:
        return text[:k] + rng.choice(list(alphabet)) + text[k:]
    return text[:k] + text[k + 1] + text[k] + text[k + 2:]


def _digit_typo(rng: np.random.Generator, digits: str) -> str:
    """One digit replaced, or two adjacent digits swapped (length kept: ids and dates)."""
    k = int(rng.integers(0, len(digits) - 1))
    if rng.random() < 0.5 and digits[k] != digits[k + 1]:
        return digits[:k] + digits[k + 1] + digits[k] + digits[k + 2:]
    return digits[:k] + rng.choice([d for d in "0123456789" if d != digits[k]]) + digits[k + 1:]


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def western_people(n: int, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    people = []
    ssids = rng.choice(np.arange(1_000_000, 9_999_999), n, replace=False)
    for p in range(n):
        year, month, day = rng.integers(1920, 2005), rng.integers(1, 13), rng.integers(1, 29)
        people.append({
            "given_name": str(rng.choice(GIVEN)), "surname": str(rng.choice(SURNAMES)),
            "street_number": str(rng.integers(1, 300)), "address_1": str(rng.choice(STREETS)),
            "address_2": str(rng.choice(PLACES)) if rng.random() < 0.5 else None,
            "suburb": str(rng.choice(SUBURBS)), "postcode": str(rng.integers(2000, 7000)),
            "state": str(rng.choice(STATES)), "date_of_birth": f"{year}{month:02d}{day:02d}",
            "soc_sec_id": str(ssids[p]),
        })
    return people


def corrupt(rng: np.random.Generator, person: dict[str, str], edits: int) -> dict[str, str]:
    """A duplicate as a second source types it: `edits` typos or blanks, FEBRL-style."""
    out = dict(person)
    fields = rng.choice(["given_name", "surname", "address_1", "suburb", "date_of_birth", "soc_sec_id",
                         "postcode", "street_number", "blank"], edits, replace=False)
    for f in fields:
        if f == "blank":
            out[str(rng.choice(["address_2", "street_number", "given_name"]))] = None
        elif f in ("date_of_birth", "soc_sec_id", "postcode"):
            out[f] = _digit_typo(rng, out[f])
        elif out[f]:
            out[f] = _typo(rng, out[f], LETTERS)
    return out


@pytest.fixture(scope="module")
def settings():
    return load_settings(CONFIG)


@pytest.fixture(scope="module")
def population():
    """1,200 records: 900 people, 300 duplicates with one or two typos each; `person` is the truth."""
    rng = np.random.default_rng(42)
    people = western_people(900, 42)
    rows = [{**p, "person": k} for k, p in enumerate(people)]
    for k in rng.choice(len(people), 300, replace=True):
        rows.append({**corrupt(rng, people[k], int(rng.integers(1, 3))), "person": int(k)})
    order = rng.permutation(len(rows))
    df = pd.DataFrame([rows[o] for o in order])
    df.insert(0, "record_id", [f"r{k:04d}" for k in range(len(df))])
    return df


def _pairs(ids: pd.Series, groups: pd.Series) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for _, members in ids.groupby(groups.to_numpy()):
        out.update(itertools.combinations(sorted(members), 2))
    return out


# ------------------------------------------------------------------------------ the config

def test_febrl_config_loads_with_estimated_parameters(settings):
    assert [f.name for f in settings.fields] == ["given_name", "surname", "date_of_birth", "soc_sec_id",
                                                 "street_number", "address_1", "address_2", "suburb",
                                                 "postcode", "state"]
    assert set(settings.input_columns) == set(COLUMNS) - {"record_id"}
    # nothing tuned on a truth: no m, u or prior in the file, so everything is estimated per input
    assert settings.prior is None
    assert all(level.m is None and level.u is None for f in settings.fields for level in f.comparator.levels or [])
    assert all(f.comparator.else_.m is None and f.comparator.else_.u is None for f in settings.fields)
    assert (settings.thresholds.merge, settings.thresholds.review) == (0.99, 0.80)
    # typos in one field must not veto a merge through the clustering's strong-value rule
    assert not any(f.strong for f in settings.fields)
    # one address is one piece of evidence (a household shares all of it)
    assert {f.name for f in settings.fields if f.group == "address"} == {
        "street_number", "address_1", "address_2", "suburb", "postcode", "state"}
    assert {str(rule.keys[0]) for rule in settings.blocking} >= {"soc_sec_id.value", "date_of_birth.value"}


def test_one_digit_typos_in_dates_and_ids_fall_in_the_near_level(settings):
    df = pd.DataFrame([
        ("a", "19650302", "5304218", "4223"),
        ("b", "19650320", "5304281", "4232"),   # two digits swapped in each
        ("c", "19650312", "5304918", "4213"),   # one digit replaced in each
        ("d", "19561203", "8812345", "6011"),   # another person
    ], columns=["record_id", "date_of_birth", "soc_sec_id", "postcode"])
    doc = {"fields": [{"name": f, "column": f, "normaliser": "text", "comparator": settings.field(f).comparator.model_dump(by_alias=True, exclude_none=True)}
                      for f in ("date_of_birth", "soc_sec_id", "postcode")],
           "blocking": ["date_of_birth"], "thresholds": {"merge": 0.99, "review": 0.8}}
    sub = parse_settings(doc, "febrl-subset")
    enc = features.encode(features.build(df, sub, workers=1), sub)
    i, j = np.array([0, 0, 0, 0]), np.array([0, 1, 2, 3])
    for f, spec in enumerate(sub.fields):
        names = spec.level_names
        got = [names[k] for k in scoring.field_levels(enc, spec, i, j)]
        assert got[0] == "exact"
        assert got[1] != "else" and got[2] != "else", (spec.name, got)   # a typo is still near
        assert got[3] == "else", (spec.name, got)                        # another person is not


# ------------------------------------------------------------------------------ resolution

@pytest.fixture(scope="module")
def resolved(population, settings):
    res = engine.resolve(population.drop(columns=["person"]), settings, estimate=True, explain=False)
    return res, res.assignments.set_index("record_id").loc[population["record_id"]]


def test_parameters_are_estimated_not_taken_from_the_config(resolved):
    res, _ = resolved
    origin = res.params.origin
    assert origin["m"].startswith("EM") and origin["u"].startswith("random sampling")
    # EM learns that agreeing on a social security id is strong evidence, a state weak evidence
    w_ssid = np.log2(res.params.m["soc_sec_id"][0] / res.params.u["soc_sec_id"][0])
    w_state = np.log2(res.params.m["state"][0] / res.params.u["state"][0])
    assert w_ssid > 10 > w_state > 0


def test_typo_duplicates_are_merged_and_different_people_are_not(population, resolved):
    _, a = resolved
    found = _pairs(population["record_id"], a["cluster_id"])
    true = _pairs(population["record_id"], population["person"])
    precision = len(found & true) / max(1, len(found))
    recall = len(found & true) / max(1, len(true))
    assert precision >= 0.99, precision
    assert recall >= 0.95, recall
    assert (a["decision"] == "review").mean() <= 0.02


def test_a_typod_duplicate_joins_and_a_lookalike_stays_apart(population, settings):
    base = population.drop(columns=["person"])
    original = {"given_name": "catherine", "surname": "fitzgerald", "street_number": "17",
                "address_1": "wattle grove", "address_2": None, "suburb": "kiama", "postcode": "2533",
                "state": "nsw", "date_of_birth": "19710514", "soc_sec_id": "3141592"}
    typos = {**original, "given_name": "catherien", "surname": "fitzgerlad", "date_of_birth": "19710541",
             "soc_sec_id": "3141529"}
    # same surname, street, suburb, postcode and state: her sister at the same address
    sister = {**original, "given_name": "margaret", "date_of_birth": "19740222", "soc_sec_id": "2718281"}
    extra = pd.DataFrame([{"record_id": "x-org", **original}, {"record_id": "x-dup", **typos},
                          {"record_id": "x-sister", **sister}])
    res = engine.resolve(pd.concat([base, extra], ignore_index=True), settings, estimate=True)
    a = res.assignments.set_index("record_id")
    assert a.loc["x-org", "cluster_id"] == a.loc["x-dup", "cluster_id"]
    assert a.loc["x-dup", "decision"] == "merged"
    assert a.loc["x-sister", "cluster_id"] != a.loc["x-org", "cluster_id"]
    assert a.loc["x-sister", "decision"] == "new"
    # the merge is explained field by field: the typo'd fields sit in their near levels
    fields = a.loc["x-dup", "explanation"]["fields"]
    assert fields["soc_sec_id"]["level"] != "else" and fields["soc_sec_id"]["weight"] > 0
    assert fields["date_of_birth"]["level"] != "else" and fields["date_of_birth"]["weight"] > 0


def test_crm_sync_match_on_a_western_csv(population, tmp_path, capsys):
    source, out = tmp_path / "people.csv", tmp_path / "clusters.csv"
    population.drop(columns=["person"]).to_csv(source, index=False)
    assert main(["match", "--config", str(CONFIG), str(source), "--out", str(out)]) == 0
    assert "records ->" in capsys.readouterr().out
    result = pd.read_csv(out, dtype=str).set_index("record_id").loc[population["record_id"]]
    found = _pairs(population["record_id"], result["cluster_id"])
    true = _pairs(population["record_id"], population["person"])
    assert len(found & true) / max(1, len(found)) >= 0.99
    assert len(found & true) / max(1, len(true)) >= 0.95


def test_a_name_over_two_columns_with_a_blank_part(settings):
    doc = {"fields": [{"name": "full_name", "columns": ["given_name", "surname"], "normaliser": "text",
                       "comparator": {"type": "string"}}],
           "blocking": ["full_name"], "thresholds": {"merge": 0.99, "review": 0.8}}
    sub = parse_settings(doc, "two-columns")
    df = pd.DataFrame({"record_id": ["a", "b"], "given_name": ["lucy", None], "surname": ["white", "white"]})
    built = features.build(df, sub, workers=1)
    assert list(built["full_name.value"]) == ["lucy white", "white"]
