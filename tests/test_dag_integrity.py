"""DAG integrity: every source DAG parses, carries the operational settings, and stays cheap to parse."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"


def _dagbag(env_overrides: dict[str, str] | None = None):
    """Parse the DAG folder in a child process (Airflow settings are read at import)."""
    code = f"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder={str(DAGS)!r})
out = {{"errors": {{k: v for k, v in bag.import_errors.items()}}, "dags": {{}}}}
for dag_id, dag in bag.dags.items():
    out["dags"][dag_id] = {{
        "tags": sorted(dag.tags), "catchup": dag.catchup, "max_active_runs": dag.max_active_runs,
        "timetable": type(dag.timetable).__name__, "doc_md": bool(dag.doc_md),
        "tasks": {{t.task_id: {{"retries": t.retries, "pool": t.pool, "backoff": bool(t.retry_exponential_backoff),
                   "upstream": sorted(t.upstream_task_ids)}} for t in dag.tasks}},
    }}
print("JSON" + json.dumps(out))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "plugins"), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW_HOME=str(ROOT / ".local" / "airflow-test"))
    env.update(env_overrides or {})
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("JSON"))
    return json.loads(line[4:])


@pytest.fixture(scope="module")
def bag():
    return _dagbag()


def test_no_import_errors(bag):
    assert bag["errors"] == {}
    sources = ("erp", "ticketing", "im", "callcenter", "finance", "spreadsheet")
    assert set(bag["dags"]) == {f"crm_sync__{s}" for s in sources} | {"crm_sync__identity_estimate"}
    # each API source's calls go through its own pool
    for source in ("ticketing", "im", "callcenter"):
        extracts = [t for tid, t in bag["dags"][f"crm_sync__{source}"]["tasks"].items() if tid.startswith("extract.")]
        assert extracts and all(t["pool"] == f"{source}_api" for t in extracts), source


def test_every_dag_has_operational_settings(bag):
    for dag_id, dag in bag["dags"].items():
        assert dag["tags"], dag_id
        assert dag["catchup"] is False, dag_id
        assert dag["max_active_runs"] == 1, dag_id
        assert dag["timetable"] == "CronDataIntervalTimetable", dag_id
        assert dag["doc_md"], dag_id
        for task_id, task in dag["tasks"].items():
            assert task["retries"] >= 2, f"{dag_id}.{task_id}"
            assert task["backoff"], f"{dag_id}.{task_id}"


def test_stage_order_is_extract_resolve_map_validate_load_reconcile(bag):
    tasks = bag["dags"]["crm_sync__erp"]["tasks"]
    assert tasks["resolve.identities"]["upstream"] == ["extract.customers", "extract.orders"]
    assert tasks["map.orders"]["upstream"] == ["resolve.identities"]
    assert set(tasks["validate.customers"]["upstream"]) == {"map.customers", "map.orders"}
    assert set(tasks["load.publish"]["upstream"]) == {"validate.customers", "validate.orders"}
    assert tasks["reconcile.check"]["upstream"] == ["load.publish"]


def test_api_source_extracts_in_its_pool(bag):
    tasks = bag["dags"]["crm_sync__ticketing"]["tasks"]
    assert tasks["extract.users"]["pool"] == "ticketing_api"
    assert tasks["extract.tickets"]["pool"] == "ticketing_api"
    assert tasks["load.publish"]["pool"] == "default_pool"


@pytest.mark.parametrize("dag_file", sorted(p.name for p in DAGS.glob("crm_sync__*.py")))
def test_parsing_a_dag_file_imports_nothing_heavy(dag_file):
    code = f"""
import runpy, sys
runpy.run_path({str(DAGS / dag_file)!r})
heavy = sorted(m for m in ("pandas", "great_expectations", "rapidfuzz", "psycopg2", "phonenumbers", "opencc",
                            "pypinyin") if m in sys.modules)
print("HEAVY", ",".join(heavy))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "plugins"), AIRFLOW_HOME=str(ROOT / ".local" / "airflow-test"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("HEAVY"))
    assert line == "HEAVY ", f"{dag_file} imports heavy modules at parse time: {line[6:]}"


def test_a_broken_source_yaml_fails_only_its_own_dag(tmp_path):
    include = tmp_path / "include"
    shutil.copytree(ROOT / "include", include)
    broken = include / "sources" / "ticketing.yaml"
    broken.write_text(broken.read_text().replace("primary_key: id", "primary_key: 123\n    bogus_key: 1", 1))
    bag = _dagbag({"CRM_SYNC_INCLUDE_DIR": str(include)})
    assert "crm_sync__erp" in bag["dags"]
    assert "crm_sync__ticketing" not in bag["dags"]
    (path, message), = bag["errors"].items()
    assert path.endswith("crm_sync__ticketing.py")
    assert str(broken) in message
    assert "streams.0.bogus_key" in message


def test_the_match_parameters_are_re_estimated_on_a_schedule_not_by_runs(bag):
    """Issue 11: m/u estimated when the operator asks or on a schedule, never per batch."""
    estimate = bag["dags"]["crm_sync__identity_estimate"]
    assert list(estimate["tasks"]) == ["estimate"]
    assert estimate["timetable"] == "CronDataIntervalTimetable"
