"""Source YAML validation: errors name the file and the field."""
from __future__ import annotations

import pytest
import yaml

from crm_sync.config import ConfigError, all_source_names, load_source, load_source_file


def test_shipped_sources_are_valid():
    assert {"erp", "ticketing"} <= set(all_source_names())
    for name in all_source_names():
        cfg = load_source(name)
        assert cfg.dag_id == f"crm_sync__{name}"
        assert cfg.retries >= 2


def _write(tmp_path, name, doc):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


def _erp_doc():
    return yaml.safe_load(load_source_file.__globals__["source_path"]("erp").read_text())


def test_unknown_mapping_target_names_file_and_field(tmp_path):
    doc = _erp_doc()
    doc["streams"][1]["mapping"]["amount_usd"] = {"from": "amount", "type": "numeric"}
    path = _write(tmp_path, "erp", doc)
    with pytest.raises(ConfigError) as err:
        load_source_file(path)
    assert str(path) in str(err.value)
    assert "streams.1" in str(err.value) and "amount_usd" in str(err.value)


def test_wrong_type_names_the_field(tmp_path):
    doc = _erp_doc()
    doc["retries"] = 1
    path = _write(tmp_path, "erp", doc)
    with pytest.raises(ConfigError, match=r"field 'retries'"):
        load_source_file(path)


def test_source_name_must_match_file(tmp_path):
    path = _write(tmp_path, "other", _erp_doc())
    with pytest.raises(ConfigError, match="must match the file name"):
        load_source_file(path)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_source_file(tmp_path / "nope.yaml")
    bad = tmp_path / "erp.yaml"
    bad.write_text("source: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_source_file(bad)
