"""Builds one Airflow DAG per source from its YAML: extract >> resolve >> map >> validate >> load >> reconcile.

Parse-time cost is the YAML and pydantic only: every task body imports its stage (pandas, GX,
psycopg2) when it runs. The schedule is a data-interval timetable, so each run owns the window
`[data_interval_start, data_interval_end)` and the extract is bounded by its end.
"""
from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, TaskGroup, chain, dag, task

from crm_sync.config import SourceConfig, load_source

START_DATE = pendulum.datetime(2026, 1, 1, tz="UTC")


@task
def extract(source: str, stream: str, **context) -> dict:
    from crm_sync import tasks

    return tasks.extract(source, stream, context)


@task
def resolve(source: str, **context) -> dict:
    from crm_sync import tasks

    return tasks.resolve(source, context)


@task
def map_stream(source: str, stream: str, **context) -> dict:
    from crm_sync import tasks

    return tasks.map_stream(source, stream, context)


@task
def validate_stream(source: str, stream: str, **context) -> dict:
    from crm_sync import tasks

    return tasks.validate_stream(source, stream, context)


@task
def load(source: str, **context) -> dict:
    from crm_sync import tasks

    return tasks.load(source, context)


@task
def reconcile(source: str, **context) -> dict:
    from crm_sync import tasks

    return tasks.reconcile(source, context)


@task
def estimate_match_params(**context) -> dict:
    from crm_sync import tasks

    return tasks.estimate_match_params(context)


def _doc(cfg: SourceConfig) -> str:
    streams = "\n".join(
        f"| `{s.name}` | {s.entity} | `{s.primary_key}` | `{s.cursor_field}` | `{s.expectation_suite}` |"
        for s in cfg.streams
    )
    return f"""### {cfg.dag_id}

{cfg.description}

Configured in `include/sources/{cfg.source}.yaml` — {cfg.sync_mode} sync, schedule `{cfg.schedule}` ({cfg.timezone}),
connection `{cfg.conn_id}`, CRM connection `{cfg.crm_conn_id}`.

| stream | entity | key | cursor | suite |
|---|---|---|---|---|
{streams}

**Trigger with config** to rerun a window (`window_start` / `window_end`), force a `full_refresh`,
pick `streams`, run the late-row `sweep` now, or release the delete brake (`allow_deletes`).
A scheduled run reads its own data interval.

**On failure** the on-call address gets an e-mail. Rejected rows are in `sync.quarantine`
(`where run_id = '<run id>'`), expectation results in `sync.dq_result`, figures in `sync.run_log`.
A blocked batch never loads and its watermark (`sync.watermark`) does not move: fix the source,
then clear the failed task. `crm-sync status` shows every source at a glance.
"""


def _params(cfg: SourceConfig) -> dict:
    """The trigger form: everything optional; a scheduled run uses the defaults (its own data interval)."""
    return {
        "full_refresh": Param(False, type="boolean", title="Full refresh",
                              description="Read every row the source holds, not just the data interval "
                                          "(a full snapshot also soft-deletes rows the source no longer has)."),
        "window_start": Param(None, type=["null", "string"], format="date-time", title="Window start",
                              description="Read rows whose cursor is at or after this instant (ISO 8601, UTC "
                                          "if no offset). Empty: the run's data interval."),
        "window_end": Param(None, type=["null", "string"], format="date-time", title="Window end",
                            description="Read rows whose cursor is before this instant. Empty: the data "
                                        "interval's end."),
        "streams": Param([], type="array", items={"type": "string", "enum": [s.name for s in cfg.streams]},
                         title="Streams", description="Only these streams (empty: every stream)."),
        "sweep": Param(False, type="boolean", title="Late-row sweep",
                       description="Read the source's sweep horizon back (sweep.horizon_hours) to catch rows "
                                   "committed after their window was read."),
        "allow_deletes": Param(False, type="boolean", title="Allow mass deletes",
                               description="Release the delete brake for this run: soft-delete every key a full "
                                           "snapshot no longer holds, even more than max_delete_share of a "
                                           "stream. Only after checking the source really dropped them."),
    }


def _under_dags_test() -> bool:
    """`airflow dags test` (the tests' runner; the demo's `crm_sync.dag_runner` sets CRM_SYNC_DEADLINES=off)
    crashes after a successful run of any DAG with a deadline (apache/airflow#73428, open in 3.3.2:
    `'dict' object has no attribute 'hex'`). A deadline means nothing to a run that command drives in
    the foreground, so it is left off there."""
    import sys

    return sys.argv[1:3] == ["dags", "test"] or os.environ.get("CRM_SYNC_DEADLINES") == "off"


def _deadline(cfg: SourceConfig):
    """A run not finished `alerts.deadline_minutes` after it was queued alerts on-call (once per incident)."""
    if not cfg.alerts.deadline_minutes or _under_dags_test():
        return None
    from airflow.sdk import DeadlineAlert, DeadlineReference, SyncCallback

    return DeadlineAlert(reference=DeadlineReference.DAGRUN_QUEUED_AT,
                         interval=timedelta(minutes=cfg.alerts.deadline_minutes),
                         callback=SyncCallback("crm_sync.alerts.deadline_missed",
                                               kwargs={"source": cfg.source,
                                                       "deadline_minutes": cfg.alerts.deadline_minutes}))


def build_dag(source: str):
    from crm_sync.tasks import FailureCallback

    cfg = load_source(source)
    retry_delay = int(os.environ.get("CRM_SYNC_RETRY_DELAY_SECONDS", cfg.retry_delay_seconds))

    @dag(
        dag_id=cfg.dag_id,
        description=cfg.description or None,
        schedule=CronDataIntervalTimetable(cfg.schedule, timezone=cfg.timezone),
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        tags=["crm-sync", cfg.source, cfg.kind, cfg.sync_mode, *cfg.tags],
        doc_md=_doc(cfg),
        params=_params(cfg),
        deadline=_deadline(cfg),
        default_args={
            "execution_timeout": timedelta(minutes=cfg.task_timeout_minutes),
            "owner": "crm-sync",
            "retries": cfg.retries,
            "retry_delay": timedelta(seconds=retry_delay),
            "retry_exponential_backoff": 2.0,
            "max_retry_delay": timedelta(minutes=30),
            "on_failure_callback": FailureCallback(cfg.source),
        },
    )
    def pipeline():
        api = {"pool": cfg.pool, "pool_slots": cfg.pool_slots} if cfg.pool else {}
        with TaskGroup("extract") as extract_group:
            for s in cfg.streams:
                extract.override(task_id=s.name, **api)(cfg.source, s.name)
        with TaskGroup("resolve") as resolve_group:
            resolve.override(task_id="identities")(cfg.source)
        with TaskGroup("map") as map_group:
            for s in cfg.streams:
                map_stream.override(task_id=s.name)(cfg.source, s.name)
        with TaskGroup("validate") as validate_group:
            for s in cfg.streams:
                validate_stream.override(task_id=s.name)(cfg.source, s.name)
        with TaskGroup("load") as load_group:
            load.override(task_id="publish")(cfg.source)
        with TaskGroup("reconcile") as reconcile_group:
            reconcile.override(task_id="check")(cfg.source)

        chain(extract_group, resolve_group, map_group, validate_group, load_group, reconcile_group)

    return pipeline()


ESTIMATE_DAG_ID = "crm_sync__identity_estimate"


def build_estimate_dag():
    """The scheduled re-estimation of the match parameters (m/u, matches per record) over the master:
    what `crm-sync identity estimate` does on demand. Runs never estimate on their own."""
    from crm_sync import paths
    from crm_sync.identity.settings import load_settings

    settings = load_settings(paths.include_dir() / "match" / "customer.yaml")
    retry_delay = int(os.environ.get("CRM_SYNC_RETRY_DELAY_SECONDS", 300))

    @dag(
        dag_id=ESTIMATE_DAG_ID,
        description="Re-estimate the identity match parameters over the master",
        schedule=CronDataIntervalTimetable(settings.estimation.schedule, timezone="UTC"),
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        tags=["crm-sync", "identity", "maintenance"],
        doc_md=f"""### {ESTIMATE_DAG_ID}

Estimates the match parameters of `include/match/customer.yaml` (`{settings.name}`) by EM over a random
sample of the master (`crm.source_identity`) and stores them in `crm.match_params`; every source's next
resolve uses the newest. Schedule `{settings.estimation.schedule}` (UTC), from `estimation.schedule` in
that file. The same as `crm-sync identity estimate`, which an operator runs on demand.

A master with fewer than `estimation.min_records` records is too small to estimate from: the run
is **skipped** with that reason and the config's values stay in use. A failed run changes nothing:
the parameters in use stay those of the last estimate (`crm-sync identity estimate --json` shows them).
""",
        default_args={
            "execution_timeout": timedelta(hours=2),
            "owner": "crm-sync",
            "retries": 2,
            "retry_delay": timedelta(seconds=retry_delay),
            "retry_exponential_backoff": 2.0,
            "max_retry_delay": timedelta(hours=1),
        },
    )
    def identity_estimate():
        estimate_match_params.override(task_id="estimate")()

    return identity_estimate()
