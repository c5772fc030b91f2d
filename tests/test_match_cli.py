"""`crm-sync match` as the README shows it: the worked example config, on a labelled CSV."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pandas as pd
import pytest

from crm_sync.cli import main
from crm_sync.identity import evalset

ROOT = Path(__file__).resolve().parents[1]


def _readme_config(tmp_path: Path) -> Path:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"Worked example.*?```yaml\n(.*?)```", text, re.S)
    assert match, "the README lost its worked match-config example"
    path = tmp_path / "match.yaml"
    path.write_text(match.group(1), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("match")
    df = evalset.generate(400, 11)
    df.drop(columns=["person_id"]).to_csv(tmp / "in.csv", index=False)
    return tmp, df


def _pairs(frame: pd.DataFrame, column: str) -> set[tuple[str, str]]:
    pairs: set[tuple[str, str]] = set()
    for _, group in frame.groupby(column):
        pairs.update(itertools.combinations(sorted(group["record_id"]), 2))
    return pairs


@pytest.mark.parametrize("config", ["readme", "default"])
def test_match_csv_with_the_documented_configs(labelled, tmp_path, config, capsys):
    tmp, truth = labelled
    cfg = _readme_config(tmp_path) if config == "readme" else ROOT / "include" / "match" / "customer.yaml"
    out = tmp_path / "out.csv"
    assert main(["match", "--config", str(cfg), str(tmp / "in.csv"), "--out", str(out)]) == 0
    assert "records ->" in capsys.readouterr().out
    result = pd.read_csv(out, dtype=str)
    assert list(result.columns) == ["record_id", "cluster_id", "decision", "score"]
    assert set(result["decision"]) <= {"merged", "review", "new"}
    assert sorted(result["record_id"]) == sorted(truth["record_id"])
    joined = result.merge(truth[["record_id", "person_id"]], on="record_id")
    found, true = _pairs(joined, "cluster_id"), _pairs(joined, "person_id")
    precision = len(found & true) / max(1, len(found))
    recall = len(found & true) / max(1, len(true))
    assert precision >= 0.99, precision      # a false merge is the expensive mistake
    assert recall >= 0.6, recall             # far above nothing: the engine does join people


def test_a_config_error_is_reported_without_a_traceback(labelled, tmp_path, capsys):
    tmp, _ = labelled
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfields:\n  - name: name\n    column: nme\n    normaliser: person_name\n"
                   "    comparator: {type: name}\nblocking: [[name.pinyin]]\nthresholds: {merge: 0.9, review: 0.5}\n")
    assert main(["match", "--config", str(bad), str(tmp / "in.csv"), "--out", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err
    assert "nme" in err and "Traceback" not in err
