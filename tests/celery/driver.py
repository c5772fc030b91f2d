"""Unpause and trigger the source DAGs of a running Celery stack, then wait for their runs (started by `run.py`).

It runs inside the stack's Airflow environment (its own process, so Airflow's configuration is the
stack's, not the caller's). Argument: one JSON document

    {"dag_ids": [...], "logical_date": "<ISO 8601>", "order": "sequential" | "concurrent", "timeout_s": 900}

First it creates the Airflow pools the source YAMLs name (as `crm_sync.demo.ensure_pools` does,
without a CLI start per pool). Each run is a manual run whose `logical_date` and `run_after` are both `logical_date`, so its data
interval is the one `airflow dags test <dag> <logical_date>` gives the reference run. `sequential`
unpauses and triggers one DAG after the previous run finished (the order of `dag_ids`: identity
resolution depends on which source creates a customer first); `concurrent` triggers all at once.
Prints one line per event, `EVENT` and a JSON document: `triggered` (dag_id, run_id), `finished`
(dag_id, run_id, state) or `timeout` (anything else on stdout is Airflow's logging). Exit code 0 when every run finished, whatever its state; the caller judges the states.
"""
from __future__ import annotations

import json
import sys
import time

FINISHED = ("success", "failed")
EVENT = "CRM_SYNC_EVENT "


def _emit(**event) -> None:
    print(EVENT + json.dumps(event), flush=True)


def _ensure_pools() -> None:
    from airflow.models.pool import Pool

    from crm_sync.config import all_source_names, load_source

    for name in all_source_names():
        cfg = load_source(name)
        if cfg.pool:
            Pool.create_or_update_pool(cfg.pool, cfg.pool_slots, f"crm-sync: calls against the {cfg.source} source",
                                       include_deferred=False)


def _unpause(dag_id: str) -> None:
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        model = DagModel.get_dagmodel(dag_id, session=session)
        if model is None:
            raise SystemExit(f"DAG {dag_id} is not in the metadata database (did the dag-processor parse it?)")
        model.is_paused = False


def _trigger(dag_id: str, when) -> str:
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.utils.types import DagRunTriggeredByType

    run = trigger_dag(dag_id, triggered_by=DagRunTriggeredByType.CLI, logical_date=when, run_after=when,
                      triggering_user_name="make test-celery")
    _emit(event="triggered", dag_id=dag_id, run_id=run.run_id)
    return run.run_id


def _states(runs: dict[str, str]) -> dict[str, str]:
    from sqlalchemy import select

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.execute(select(DagRun.dag_id, DagRun.run_id, DagRun.state)
                               .where(DagRun.dag_id.in_(list(runs)))).all()
    return {dag_id: str(getattr(state, "value", state)) for dag_id, run_id, state in rows
            if runs.get(dag_id) == run_id}


def _wait(runs: dict[str, str], deadline: float) -> bool:
    pending = dict(runs)
    while pending:
        if time.monotonic() > deadline:
            _emit(event="timeout", pending=sorted(pending))
            return False
        for dag_id, state in _states(pending).items():
            if state in FINISHED:
                _emit(event="finished", dag_id=dag_id, run_id=pending.pop(dag_id), state=state)
        if pending:
            time.sleep(1)
    return True


def main(argv: list[str]) -> int:
    from airflow.utils import timezone

    spec = json.loads(argv[0])
    when = timezone.parse(spec["logical_date"])
    deadline = time.monotonic() + float(spec.get("timeout_s", 900))
    dag_ids = spec["dag_ids"]
    _ensure_pools()
    if spec.get("order", "sequential") == "concurrent":
        runs = {}
        for dag_id in dag_ids:
            _unpause(dag_id)
            runs[dag_id] = _trigger(dag_id, when)
        return 0 if _wait(runs, deadline) else 1
    for dag_id in dag_ids:
        _unpause(dag_id)
        if not _wait({dag_id: _trigger(dag_id, when)}, deadline):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
