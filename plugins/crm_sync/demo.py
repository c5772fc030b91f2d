"""The demo harness: sample sources, local services and real Airflow runs of every source DAG.

`run_demo()` is what `make demo` runs after setup. It guarantees:
- the CRM database is the embedded PostgreSQL under `.local/pg` unless `CRM_SYNC_DSN` is set, and
  is migrated before anything runs;
- the sample sources exist: the ERP schema `src_erp` in its own database (seeded on the first run,
  an "incremental day" of changes on every later one) and the ticketing API simulator on loopback
  (its state is kept under `.local/demo/` so a second demo continues where the first stopped);
- alert e-mails land as `.eml` files under `.local/outbox/` through a local SMTP server;
- every source DAG runs once as `airflow dags test` runs it (`DAG.test()`: a real Airflow run with the
  metadata DB on SQLite under `.local/airflow`), all of them in order in one child Airflow process
  (`crm_sync.dag_runner`), with connections passed as `AIRFLOW_CONN_*` variables of that child
  process only (and on its stdin pipe), so no secret is written to disk or printed;
- nothing the pipeline runs is a superuser: the server's administrator only creates databases and
  roles, seeds the sample sources and runs the migrations as `crm_owner`; the DAGs connect to the
  CRM as `crm_sync_loader` (a member of `crm_loader`) and to the ERP and finance databases as their
  read-only readers. Passwords come from `CRM_SYNC_LOADER_PASSWORD`, `CRM_SYNC_ERP_READER_PASSWORD`
  and `CRM_SYNC_FINANCE_READER_PASSWORD`, else are generated per invocation;
- a scenario replays a failure so the gates can be seen working; the demo then exits 0 when the
  gate held (the DAG failed as it should, nothing was loaded, an alert was sent).
"""
from __future__ import annotations

import json
import os
import pickle
import secrets
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from crm_sync import db, paths
from crm_sync.config import SourceConfig, load_source

SCENARIOS = ("bad-batch", "volume-drop", "schema-drift", "api-outage", "drift", "recovery")
# scenarios whose run is meant to fail at a gate (the others: drift loads and warns, recovery fails then heals)
FAILING_SCENARIOS = ("bad-batch", "volume-drop", "schema-drift", "api-outage")
# customer-rich sources first, so a call or chat finds its customer in the same demo run
DEMO_SOURCES = ("erp", "finance", "spreadsheet", "ticketing", "im", "callcenter")
ERP_DATABASE = "crm_src_erp"
FINANCE_DATABASE = "crm_src_finance"
PEOPLE = 2000
SEED = 42
# the demo pipeline's logins (roles are cluster-wide, so each is named after what it reads)
LOADER_LOGIN = "crm_sync_loader"
ERP_READER = f"{ERP_DATABASE}_reader"
FINANCE_READER = f"{FINANCE_DATABASE}_reader"

# which source's gate each scenario exercises
SCENARIO_SOURCE = {"bad-batch": "erp", "volume-drop": "erp", "schema-drift": "erp", "api-outage": "ticketing",
                   "drift": "erp", "recovery": "erp"}


def demo_dir() -> Path:
    path = paths.local_dir() / "demo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def outbox_dir() -> Path:
    path = paths.local_dir() / "outbox"
    path.mkdir(parents=True, exist_ok=True)
    return path


def airflow_home() -> Path:
    path = paths.local_dir() / "airflow"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class DemoState:
    """What the demo remembers between invocations (sample-source state, not pipeline state)."""

    runs: int = 0
    history: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls) -> "DemoState":
        path = demo_dir() / "state.json"
        if path.exists():
            return cls(**json.loads(path.read_text()))
        return cls()

    def save(self) -> None:
        (demo_dir() / "state.json").write_text(json.dumps(self.__dict__, indent=2, default=str))


def interval_end(cfg: SourceConfig, now: datetime) -> datetime:
    """End of the latest complete data interval at `now` — what a manual run at `now` covers."""
    from airflow.timetables.interval import CronDataIntervalTimetable
    from pendulum import instance

    timetable = CronDataIntervalTimetable(cfg.schedule, timezone=cfg.timezone)
    return timetable.infer_manual_data_interval(run_after=instance(now)).end


def airflow_env(connections: dict[str, str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a child Airflow process: local SQLite metadata, the project's folders, connections."""
    root = paths.project_root()
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(airflow_home()),
        "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(root / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": env.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
        "CRM_SYNC_RETRY_DELAY_SECONDS": env.get("CRM_SYNC_RETRY_DELAY_SECONDS", "1"),
        "GX_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "plugins"), env.get("PYTHONPATH")])),
    })
    for conn_id, value in connections.items():
        env[f"AIRFLOW_CONN_{conn_id.upper()}"] = value
    env.update(extra or {})
    return env


def ensure_airflow_db(env: dict[str, str]) -> None:
    """`airflow db migrate` once per AIRFLOW_HOME (SQLite metadata DB of the demo and the tests)."""
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    marker = home / ".migrated"
    if marker.exists() and (home / "airflow.db").exists():
        return
    run = subprocess.run([_airflow_bin(), "db", "migrate"], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    ensure_pools(env)
    marker.write_text("ok\n")


def ensure_pools(env: dict[str, str]) -> None:
    """Create the Airflow pools the source YAMLs name (a task in a missing pool never runs)."""
    from crm_sync.config import all_source_names

    for name in all_source_names():
        cfg = load_source(name)
        if not cfg.pool:
            continue
        run = subprocess.run([_airflow_bin(), "pools", "set", cfg.pool, str(cfg.pool_slots),
                              f"crm-sync: calls against the {cfg.source} source"], env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"airflow pools set {cfg.pool} failed:\n{run.stderr[-2000:]}")


def _airflow_bin() -> str:
    candidate = Path(sys.executable).with_name("airflow")
    return str(candidate) if candidate.exists() else "airflow"


def run_dag(dag_id: str, logical_date: datetime, env: dict[str, str], log_path: Path) -> int:
    """`airflow dags test DAG_ID DATE`; output to `log_path`; returns the exit code."""
    with log_path.open("w") as log:
        proc = subprocess.run([_airflow_bin(), "dags", "test", dag_id, logical_date.isoformat()],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc.returncode


def run_dags(steps: list[tuple[str, datetime, dict[str, str], Path]], on_done=None) -> list[dict]:
    """Several DAG runs (dag_id, logical date, environment, log) in order, in one Airflow process
    (`crm_sync.dag_runner`: what `airflow dags test` does per run, start-up paid once). Returns per
    step `{"dag_id", "exit", "seconds"}`, each also passed to `on_done` as it finishes; a step the
    runner never reached (it died) exits 1, with the runner's error appended to its log."""
    from crm_sync import dag_runner

    if not steps:
        return []
    base = steps[0][2]
    plan = []
    for dag_id, logical_date, env, log_path in steps:
        changes: dict[str, str | None] = {k: v for k, v in env.items() if base.get(k) != v}
        changes.update({k: None for k in base if k not in env})
        plan.append({"dag_id": dag_id, "logical_date": logical_date.isoformat(), "log": str(log_path),
                     "env": changes})
    done: list[dict] = []
    # the plan (connections included) goes through a pipe, never a file
    with subprocess.Popen([sys.executable, "-m", "crm_sync.dag_runner"], env=base, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        proc.stdin.write(json.dumps(plan))
        proc.stdin.close()
        for line in proc.stdout:
            if line.startswith(dag_runner.MARKER):
                done.append(json.loads(line[len(dag_runner.MARKER):]))
                if on_done:
                    on_done(done[-1])
        error = proc.stderr.read()
    for dag_id, _, _, log_path in steps[len(done):]:
        with Path(log_path).open("a") as log:
            log.write(f"crm-sync dag runner exited {proc.returncode} before this run finished:\n{error[-4000:]}\n")
        done.append({"dag_id": dag_id, "exit": 1, "seconds": 0.0})
        if on_done:
            on_done(done[-1])
    return done


class _Sources:
    """Prepares the sample sources for one demo invocation.

    A normal run moves the sources one "day" on. A scenario never damages the sample sources:
    the ERP fault is applied to a throw-away copy of the ERP database (`CREATE DATABASE ... TEMPLATE`),
    and the API fault lives only in the simulator of this invocation.
    """

    def __init__(self, state: DemoState, scenario: str | None) -> None:
        self.state = state
        self.scenario = scenario
        self.scratch: tuple[str, str] | None = None
        self.erp_dsn: str | None = None   # the real sample ERP (a scenario's fault lives in a scratch copy)

    def _prepare_database(self, admin_dsn: str, database: str, probe: str, simulator, end: datetime) -> str:
        """A sample source database: seeded on the first demo, one "day" of changes on every later one."""
        from crm_sync.simulators import people

        db.ensure_database(admin_dsn, database)
        dsn = db.with_database(admin_dsn, database)
        conn = db.connect(dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("select to_regclass(%s) is not null", (probe,))
                seeded = cur.fetchone()[0]
            conn.commit()
            if not seeded:
                simulator.seed(conn, people=people.generate_people(PEOPLE, SEED), seed=SEED,
                               now=end - timedelta(minutes=5))
            elif self.scenario is None:
                simulator.apply_changes(conn, seed=SEED + self.state.runs, now=end - timedelta(seconds=30))
        finally:
            conn.close()
        return dsn

    def prepare_erp(self, admin_dsn: str, end: datetime) -> str:
        from crm_sync.simulators import erp

        dsn = self._prepare_database(admin_dsn, ERP_DATABASE, "src_erp.customers", erp, end)
        self.erp_dsn = dsn
        if self.scenario not in ("bad-batch", "volume-drop", "schema-drift", "drift", "recovery"):
            return dsn
        scratch = f"{ERP_DATABASE}_scenario"
        db.copy_database(admin_dsn, scratch, template=ERP_DATABASE)
        self.scratch = (admin_dsn, scratch)
        scratch_dsn = db.with_database(admin_dsn, scratch)
        conn = db.connect(scratch_dsn)
        try:
            if self.scenario in ("bad-batch", "recovery"):
                erp.inject_bad_batch(conn, now=end - timedelta(seconds=10))
            elif self.scenario == "drift":
                erp.shift_distribution(conn, 0.4)
            elif self.scenario == "volume-drop":
                erp.drop_volume(conn, 0.9)
            else:
                erp.add_column_drift(conn, rename=True)
        finally:
            conn.close()
        return scratch_dsn

    def cleanup(self) -> None:
        if self.scratch:
            db.drop_database(*self.scratch)

    def prepare_api(self, name: str, end: datetime):
        """The in-memory store of an API simulator (ticketing, im, callcenter), kept between demos."""
        from crm_sync.simulators import callcenter, im, people, ticketing

        kinds = {"ticketing": ticketing.TicketingStore, "im": im.ImStore, "callcenter": callcenter.CallCenterStore}
        path = demo_dir() / f"{name}_store.pickle"
        if path.exists():
            store = pickle.loads(path.read_bytes())
            if self.scenario is None:
                # changes made since the last run: after its watermark, before this interval's end
                store.apply_changes(seed=SEED + self.state.runs, now=end - timedelta(seconds=30), window_seconds=60)
        else:
            store = kinds[name].generate(people.generate_people(PEOPLE, SEED), seed=SEED,
                                         now=end - timedelta(minutes=5))
        return store

    def save_api(self, name: str, store) -> None:
        if self.scenario is None:
            (demo_dir() / f"{name}_store.pickle").write_bytes(pickle.dumps(store))

    def prepare_finance(self, admin_dsn: str, end: datetime) -> str:
        from crm_sync.simulators import finance

        return self._prepare_database(admin_dsn, FINANCE_DATABASE, "cw.kh_zl", finance, end)

    def prepare_spreadsheet(self, end: datetime) -> Path:
        """The landing folder sales staff drop their lists into; each demo run brings new files."""
        from crm_sync.simulators import people, spreadsheet

        landing = demo_dir() / "landing"
        landing.mkdir(parents=True, exist_ok=True)
        if self.scenario is None:
            spreadsheet.write_landing(landing, people.generate_people(PEOPLE, SEED), seed=SEED + self.state.runs,
                                      now=end - timedelta(minutes=1), files=2 if self.state.runs else 6)
        return landing


def _conn_json(**doc) -> str:
    return json.dumps({k: v for k, v in doc.items() if v is not None})


def _pg_conn_json(dsn: str, login: db.Login | None) -> str:
    """The Airflow connection of `dsn`'s database, as `login` when given."""
    doc = json.loads(db.airflow_conn_json(dsn))
    if login is not None:
        doc.update(login=login.user, password=login.password)
    return json.dumps(doc)


def _reader(dsn: str, simulator, login: str, env_var: str, password: str | None = None) -> db.Login:
    with db.connection(dsn) as conn:
        return simulator.ensure_reader(conn, login=login, password=password or os.environ.get(env_var))


def _crm_fingerprint(dsn: str) -> tuple:
    """What a blocked run must leave unchanged: row counts and the newest write of the CRM tables."""
    from crm_sync import entities

    with db.connection(dsn) as conn, conn.cursor() as cur:
        parts = [f"(select count(*)::text || '/' || coalesce(max(loaded_run_id), '') from {e.target})"
                 for e in entities.ENTITIES]
        cur.execute(f"select {', '.join(parts)}, (select count(*) from crm.customer),"
                    " (select max(updated_at) from crm.customer)")
        return cur.fetchone()


def _baseline_runs_needed(dsn: str, cfg: SourceConfig) -> int:
    """Successful runs of the source missing before drift has a baseline (`drift.min_history`)."""
    with db.connection(dsn) as conn, conn.cursor() as cur:
        cur.execute("""select count(distinct m.run_id) from sync.drift_metric m
                       join sync.run_log l on l.run_id = m.run_id and l.source = m.source
                       where m.source = %s and m.run_type = 'nightly' and l.state = 'success'""", (cfg.source,))
        have = cur.fetchone()[0]
    return max(0, cfg.drift.min_history - have)


def _close_scenario_incident(conn, source: str, out) -> None:
    """A failing scenario's fault lives in a throw-away copy of the source: the sample source itself is
    healthy, so the incident the scenario opened is closed (without a message) when the demo ends."""
    with conn.cursor() as cur:
        cur.execute("""update sync.incident set state = 'resolved', resolved_run_id = 'demo: scenario over',
                              resolved_at = now()
                       where source = %s and state = 'open' returning incident_id""", (source,))
        closed = [r[0] for r in cur.fetchall()]
    conn.commit()
    if closed:
        print(f"  incident #{closed[0]} of source {source} closed: the scenario's fault lived in a throw-away "
              "copy of the source, the sample source itself is healthy.", file=out)


def _pipeline_logins(dsn: str, erp_dsn: str, finance_dsn: str) -> dict[str, db.Login]:
    """The least-privileged logins the DAGs connect as, created (or updated) by the administrator of `dsn`."""
    from crm_sync.simulators import erp, finance

    with db.connection(dsn) as conn:
        loader = db.ensure_login(conn, LOADER_LOGIN, password=os.environ.get("CRM_SYNC_LOADER_PASSWORD"),
                                 member_of=(db.LOADER_ROLE,))
    return {"crm_db": loader,
            "erp_src": _reader(erp_dsn, erp, ERP_READER, "CRM_SYNC_ERP_READER_PASSWORD"),
            "finance_src": _reader(finance_dsn, finance, FINANCE_READER, "CRM_SYNC_FINANCE_READER_PASSWORD")}


def run_demo(scenario: str | None = None, out=sys.stdout) -> int:
    if scenario is not None and scenario not in SCENARIOS:
        raise SystemExit(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    from crm_sync.simulators.callcenter import CallCenterServer
    from crm_sync.simulators.im import ImServer
    from crm_sync.simulators.smtp_outbox import OutboxServer
    from crm_sync.simulators.ticketing import Faults, TicketingServer

    started = time.monotonic()
    state = DemoState.load()
    now = datetime.now(timezone.utc)
    dsn = db.resolve_dsn()
    least_privilege = db.manages_roles(dsn)
    if least_privilege:
        db.migrate_as_owner(dsn)
    else:
        with db.connection(dsn) as conn:
            db.migrate(conn)
    admin_dsn = db.with_database(dsn, "postgres")
    configs = {name: load_source(name) for name in DEMO_SOURCES}
    ends = {name: interval_end(cfg, now) for name, cfg in configs.items()}
    sources = _Sources(state, scenario)
    print(f"crm-sync demo{' — scenario ' + scenario if scenario else ''} (run {state.runs + 1})", file=out)
    print(f"  CRM database: {db.redact_dsn(dsn)}", file=out)

    erp_dsn = sources.prepare_erp(admin_dsn, ends["erp"])
    finance_dsn = sources.prepare_finance(admin_dsn, ends["finance"])
    landing = sources.prepare_spreadsheet(ends["spreadsheet"])
    logins = _pipeline_logins(dsn, erp_dsn, finance_dsn) if least_privilege else {}
    if logins:
        print(f"  pipeline runs as {logins['crm_db'].user} ({db.LOADER_ROLE}); sources read as "
              f"{logins['erp_src'].user}, {logins['finance_src'].user} (read-only)", file=out)
    else:
        print("  CRM_SYNC_DSN's user cannot create roles: the pipeline runs as that user", file=out)
    stores = {name: sources.prepare_api(name, ends[name]) for name in ("ticketing", "im", "callcenter")}
    # per invocation; only the child processes see them
    token, im_key, cc_login, cc_password = (secrets.token_urlsafe(24) for _ in range(4))
    # a real desk answers 429 now and then: the extractor must cope
    faults = Faults(outage=True) if scenario == "api-outage" else Faults(rate_limit_every=7)
    results: dict[str, dict] = {}
    with ExitStack() as stack:
        stack.callback(sources.cleanup)
        api = stack.enter_context(TicketingServer(stores["ticketing"], token=token, faults=faults))
        im_api = stack.enter_context(ImServer(stores["im"], api_key=im_key, faults=Faults(rate_limit_every=11)))
        cc_api = stack.enter_context(CallCenterServer(stores["callcenter"], login=cc_login, password=cc_password))
        smtp = stack.enter_context(OutboxServer(outbox_dir()))
        connections = {
            "crm_db": _pg_conn_json(dsn, logins.get("crm_db")),
            "erp_src": _pg_conn_json(erp_dsn, logins.get("erp_src")),
            "finance_src": _pg_conn_json(finance_dsn, logins.get("finance_src")),
            "spreadsheet_landing": _conn_json(conn_type="fs", extra={"path": str(landing)}),
            "ticketing_api": _conn_json(conn_type="http", host="127.0.0.1", port=api.port, schema="http",
                                        password=token),
            "im_api": _conn_json(conn_type="http", host="127.0.0.1", port=im_api.port, schema="http",
                                 password=im_key),
            "callcenter_api": _conn_json(conn_type="http", host="127.0.0.1", port=cc_api.port, schema="http",
                                         login=cc_login, password=cc_password),
            "smtp_alerts": _conn_json(conn_type="smtp", host="127.0.0.1", port=smtp.port,
                                      login=None, extra={"disable_ssl": True, "disable_tls": True,
                                                         "from_email": "crm-sync@localhost", "timeout": 10,
                                                         "retry_limit": 1}),
        }
        env = airflow_env(connections)
        ensure_airflow_db(env)
        before = set(outbox_dir().glob("*.eml"))
        fingerprint = _crm_fingerprint(dsn)
        steps = [(name, env, None) for name in DEMO_SOURCES
                 if not scenario or SCENARIO_SOURCE[scenario] == name]
        if scenario in ("drift", "recovery"):
            # the real (healthy) sample ERP, read by the same reader login
            if logins:
                from crm_sync.simulators import erp as erp_simulator

                _reader(sources.erp_dsn, erp_simulator, ERP_READER, "CRM_SYNC_ERP_READER_PASSWORD",
                        password=logins["erp_src"].password)
            healthy = airflow_env({**connections, "erp_src": _pg_conn_json(sources.erp_dsn, logins.get("erp_src"))})
            if scenario == "recovery":   # the bad batch first (one alert), then the fixed source (one "resolved")
                steps = [("erp", env, "the bad batch"), ("erp", healthy, "the fixed source")]
            else:                        # enough ordinary nightly runs for a baseline, then the shifted batch
                needed = _baseline_runs_needed(dsn, configs["erp"])
                baseline = [("erp", healthy, f"baseline run {i + 1} of {needed}") for i in range(needed)]
                steps = [*baseline, ("erp", env, "the shifted batch")]
        plan = []
        for i, (name, step_env, label) in enumerate(steps):
            cfg = configs[name]
            log_path = demo_dir() / f"{cfg.dag_id}{'-' + str(i + 1) if label else ''}.log"
            plan.append((cfg.dag_id, now + timedelta(seconds=i), step_env, log_path))
        labels = iter([label for _, _, label in steps])

        def progress(done: dict) -> None:
            label = next(labels, None)
            print(f"  {done['dag_id']}{': ' + label if label else ''}: "
                  f"{'succeeded' if done['exit'] == 0 else 'failed'} in {done['seconds']:.0f}s", file=out, flush=True)

        # every run in one Airflow process, in order: identity depends on which source comes first
        for (name, _, _), (_, _, _, log_path), done in zip(steps, plan, run_dags(plan, progress)):
            results[name] = {"exit": done["exit"], "seconds": done["seconds"], "log": log_path,
                             "first_exit": results.get(name, {}).get("first_exit", done["exit"])}
        new_mail = sorted(set(outbox_dir().glob("*.eml")) - before)
        untouched = _crm_fingerprint(dsn) == fingerprint
        for name, store in stores.items():
            if results.get(name, {}).get("exit") == 0:
                sources.save_api(name, store)

    conn = db.connect(dsn)
    try:
        ok = _print_summary(conn, configs, results, new_mail, scenario, out, untouched=untouched)
        if scenario in FAILING_SCENARIOS:
            _close_scenario_incident(conn, SCENARIO_SOURCE[scenario], out)
    finally:
        conn.close()
    if scenario is None and ok:
        state.runs += 1
        state.history.append({"at": now.isoformat(), "scenario": scenario})
        state.save()
    print(f"  demo finished in {time.monotonic() - started:.1f}s", file=out)
    return 0 if ok else 1


def _print_summary(conn, configs, results, new_mail, scenario, out, *, untouched: bool = True) -> bool:
    from crm_sync import runlog
    from crm_sync.status import source_status

    print("", file=out)
    print(f"{'source':<11} {'state':<8} {'extracted':>9} {'loaded':>7} {'rejected':>8} {'merged':>7} "
          f"{'review':>6} {'new':>6} {'recon':>6} {'time':>6}", file=out)
    ok = True
    for name, res in results.items():
        st = source_status(conn, name) or {}
        run = st.get("last_run") or {}
        recon = {True: "ok", False: "FAIL", None: "-"}[run.get("reconcile_ok")]
        # what the run did: a run that loaded nothing shows no identity figures, and its rejects from every stage
        figures = runlog.counts(conn, run["run_id"], name) if run.get("run_id") else {}
        loaded = run.get("rows_loaded", 0) if "ids_new" in figures else 0
        print(f"{name:<11} {str(run.get('state', '?')):<8} {run.get('rows_extracted', 0):>9} "
              f"{loaded:>7} {figures.get('rows_rejected', 0):>8} {figures.get('ids_merged', '-'):>7} "
              f"{figures.get('ids_review', '-'):>6} {figures.get('ids_new', '-'):>6} {recon:>6} "
              f"{res['seconds']:>5.0f}s", file=out)
        if res["exit"] != 0 or run.get("state") not in ("success", "partial"):
            if scenario is None:
                ok = False
            print(f"  {name}: DAG run failed at {run.get('failed_task')}: {run.get('error')}", file=out)
            print(f"  log: {res['log']}", file=out)
    with conn.cursor() as cur:
        cur.execute("select count(*) from crm.customer where merged_into is null")
        customers = cur.fetchone()[0]
        cur.execute("select count(*) from crm.customer_link")
        links = cur.fetchone()[0]
    print(f"\nCRM master: {customers} customers, {links} source links.", file=out)
    if scenario:
        ok = _scenario_verdict(scenario, results, new_mail, untouched, out)
    elif new_mail:
        print(f"Alerts sent: {len(new_mail)} (see {outbox_dir()})", file=out)
    print(f"Alert e-mails land in {outbox_dir()}/ ; `crm-sync status` shows every source.", file=out)
    return ok


def _subject(path: Path) -> str:
    import email
    from email import policy

    return str(email.message_from_bytes(path.read_bytes(), policy=policy.default)["Subject"] or "")


def _scenario_verdict(scenario: str, results: dict, new_mail: list[Path], untouched: bool, out) -> bool:
    """Did the gate decide as the scenario expects, with exactly the message(s) it expects?"""
    res = results[SCENARIO_SOURCE[scenario]]
    subjects = [_subject(p) for p in new_mail]
    for path, subject in zip(new_mail, subjects):
        print(f"  message: {subject}\n           {path}", file=out)
    if scenario in FAILING_SCENARIOS:
        ok = res["exit"] != 0 and untouched and len(new_mail) == 1
        verdict = ("the gate held — the run stopped, the CRM is untouched, on-call got exactly one alert"
                   if ok else f"the gate did NOT hold as expected (exit {res['exit']}, CRM untouched: {untouched}, "
                              f"messages: {len(new_mail)})")
    elif scenario == "drift":
        ok = res["exit"] == 0 and len(new_mail) == 1 and "WARNING" in subjects[0]
        verdict = ("the shifted batch loaded (a warning does not block) and on-call got one drift notice"
                   if ok else f"expected a loaded run and one drift notice (exit {res['exit']}, "
                              f"messages: {subjects})")
    else:  # recovery
        ok = (res["first_exit"] != 0 and res["exit"] == 0 and len(new_mail) == 2
              and "RESOLVED" in subjects[-1] and "RESOLVED" not in subjects[0])
        verdict = ("the bad batch was blocked with one alert, the fixed source loaded and sent one RESOLVED"
                   if ok else f"expected one alert then one RESOLVED (exits {res['first_exit']}/{res['exit']}, "
                              f"messages: {subjects})")
    print(f"Scenario {scenario}: {verdict}.", file=out)
    return ok
