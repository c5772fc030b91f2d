"""Several DAG runs one after another in one Airflow process: `python -m crm_sync.dag_runner`.

`airflow dags test DAG DATE` starts a process per DAG run, and each pays again what does not
depend on the DAG: Python and Airflow's start-up, the in-process execution API, and the stages'
lazy imports (pandas, the name and phone normalisers' tables, Great Expectations when a page is
rendered) — about half of a demo run of a few thousand rows. This runner does what that command
does (`get_bagged_dag`, then `DAG.test()`: the same DagRun, the same task states, the same
callbacks) for a list of runs in order, in one process, so those costs are paid once.

Protocol (no secret touches the disk: connections travel in the environment and on a pipe):
- stdin: a JSON list of steps `{"dag_id", "logical_date" (ISO), "log" (path), "env" (variables to set
  for this step; null unsets one)}`;
- each step's output (its file descriptors 1 and 2, so every logger and print) goes to its `log`;
- stdout: one line per finished step, `MARKER` then `{"dag_id", "exit", "seconds"}` as JSON, `exit` as
  `airflow dags test` would have exited (0, or 1 when the DagRun failed or the step raised); anything
  else Airflow writes there outside a step (start-up warnings, JSON log lines) is not a result.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import datetime
from typing import Iterator


MARKER = "crm-sync-dag-runner-result "


@contextmanager
def _output_to(path: str) -> Iterator[None]:
    """Point file descriptors 1 and 2 at `path` (truncated) for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


@contextmanager
def _environment(changes: dict[str, str | None]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in changes}
    for key, value in changes.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_step(dag_id: str, logical_date: datetime) -> int:
    """One DagRun as `airflow dags test` makes it; its exit code."""
    from airflow.utils.cli import get_bagged_dag
    from airflow.utils.state import DagRunState

    dag = get_bagged_dag(None, dag_id)
    run = dag.test(logical_date=logical_date)
    return 1 if run is None or run.state == DagRunState.FAILED else 0


def main() -> int:
    # runs driven in the foreground by `DAG.test()`: a deadline means nothing to them, and one on a DAG
    # crashes that method after a successful run (see `dag_factory._under_dags_test`)
    os.environ["CRM_SYNC_DEADLINES"] = "off"
    steps = json.load(sys.stdin)
    results = os.fdopen(os.dup(1), "w", buffering=1)
    for step in steps:
        t0 = time.monotonic()
        with _environment(step.get("env") or {}), _output_to(step["log"]):
            try:
                code = run_step(step["dag_id"], datetime.fromisoformat(step["logical_date"]))
            except BaseException:   # what `airflow dags test` prints before exiting 1
                traceback.print_exc()
                code = 1
        results.write(MARKER + json.dumps({"dag_id": step["dag_id"], "exit": code,
                                           "seconds": round(time.monotonic() - t0, 2)}) + "\n")
    results.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
