"""`make test-celery`: every source DAG on CeleryExecutor with two workers, checked against a reference run.

Against the machine's services — PostgreSQL `CRM_SYNC_TEST_DSN` (an administrator's URL; default
postgresql://postgres@127.0.0.1:5432/postgres) and the Celery broker `CRM_SYNC_CELERY_BROKER`
(default redis://127.0.0.1:6379/0) — it:

1. creates databases named `crm_test_celery_<tag>*` for this run only: the Airflow metadata DB, the
   CRM the Celery run loads, the CRM the reference run loads, and the ERP and finance sample sources;
   seeds the sample sources as the demo and the integration tests do (`crm_sync.simulators`, one seed
   for both runs), serves the API simulators and an SMTP outbox on loopback, and gives the pipeline its
   least-privileged logins (`dagstack.least_privilege`);
2. starts Airflow's api-server (execution API only), scheduler, dag-processor and two Celery workers
   (`worker1@<host>`, `worker2@<host>`) on a queue of this run's own, and triggers every source DAG
   (`driver.py`) — one after the other in the demo's order, since identity resolution depends on which
   source creates a customer first; `--concurrent` triggers them all at once;
3. meanwhile runs the same DAGs with `airflow dags test` (the demo's and the integration tests' runner,
   SQLite metadata) into the reference CRM, same logical date, same order;
4. checks that every run succeeded, that task instances ran on both workers (their `hostname` in the
   metadata DB, see `worker_hostname.py`) and that both CRMs hold the same rows (every `crm` table,
   order-independent; surrogate numbers left out, run ids and the pipeline's own timestamps compared
   as present or absent), and prints a summary.

Every process it started is stopped (its session killed) and every database and login it created is
dropped, also on failure or interruption; the logs are kept (and their folder printed) only on failure.
Exit code 0 when every check passed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _sub in (ROOT / "plugins", ROOT / "tests"):
    if str(_sub) not in sys.path:
        sys.path.insert(0, str(_sub))

from crm_sync import db, demo  # noqa: E402
from crm_sync.config import load_source_file  # noqa: E402
from dagstack import airflow_env, copy_include, least_privilege  # noqa: E402
from driver import EVENT  # noqa: E402

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
SOURCES = demo.DEMO_SOURCES          # customer-rich sources first, as the demo runs them
HTTP_SOURCES = ("ticketing", "im", "callcenter")
WORKERS = ("worker1", "worker2")
SEED = demo.SEED
# timestamps the pipeline writes when it acts (not what a source said): compared as present or absent
PIPELINE_TIMES = ("deleted_at", "decided_at")


class Failure(Exception):
    """A check failed or the stack broke; the message says which and where to look."""


class Sessions:
    """Child processes, each the leader of its own session; `stop()` ends every process of those sessions.

    A session, not a process group: Airflow's task supervisor puts each task in a process group of
    its own, which a `killpg` of the worker's group would miss.
    """

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}
        self.finishing: set[str] = set()

    def start(self, name: str, argv: list[str], env: dict[str, str], *, finishes: bool = False) -> None:
        """Start `argv` as `name` (log: `<logs>/<name>.log`); `finishes`: a command, not a service."""
        with (self.logs / f"{name}.log").open("w") as log:
            self.procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
        if finishes:
            self.finishing.add(name)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if name not in self.finishing and proc.poll() is not None:
                raise Failure(f"the {name} exited early (exit code {proc.returncode}); its log: "
                              f"{self.logs / (name + '.log')}\n{tail(self.logs / (name + '.log'))}")

    def _members(self) -> list[int]:
        import psutil

        sids = {proc.pid for proc in self.procs.values()}
        members = []
        for pid in psutil.pids():
            try:
                if os.getsid(pid) in sids:
                    members.append(pid)
            except OSError:
                pass
        return members

    def stop(self, grace: float = 15.0) -> None:
        for pid in self._members():
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self._members() and time.monotonic() < deadline:
            time.sleep(0.3)
        for pid in self._members():
            _signal(pid, signal.SIGKILL)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "    (no log)"


def _sqlalchemy_url(admin_dsn: str, database: str, scheme: str) -> str:
    parsed = urlparse(db.with_database(admin_dsn, database))
    return parsed._replace(scheme=scheme).geturl()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ----------------------------------------------------------------- sample sources -----------

def _seed_database(admin_dsn: str, database: str, simulator, pool, now: datetime) -> str:
    db.ensure_database(admin_dsn, database)
    dsn = db.with_database(admin_dsn, database)
    with db.connection(dsn) as conn:
        simulator.seed(conn, people=pool, seed=SEED, now=now)
    return dsn


def _connections(crm_dsn: str, erp_dsn: str, finance_dsn: str, landing: Path, apis: dict, smtp_port: int,
                 secrets_: dict[str, str]) -> dict[str, str]:
    """The Airflow connections of one run, as the demo builds them (administrator's PostgreSQL logins:
    `dagstack.least_privilege` swaps them for the pipeline's)."""
    http = {"conn_type": "http", "host": "127.0.0.1", "schema": "http"}
    return {
        "crm_db": db.airflow_conn_json(crm_dsn),
        "erp_src": db.airflow_conn_json(erp_dsn),
        "finance_src": db.airflow_conn_json(finance_dsn),
        "spreadsheet_landing": demo._conn_json(conn_type="fs", extra={"path": str(landing)}),
        "ticketing_api": demo._conn_json(**http, port=apis["ticketing"].port, password=secrets_["token"]),
        "im_api": demo._conn_json(**http, port=apis["im"].port, password=secrets_["im_key"]),
        "callcenter_api": demo._conn_json(**http, port=apis["callcenter"].port, login=secrets_["cc_login"],
                                          password=secrets_["cc_password"]),
        "smtp_alerts": demo._conn_json(conn_type="smtp", host="127.0.0.1", port=smtp_port,
                                       extra={"disable_ssl": True, "disable_tls": True, "timeout": 10,
                                              "retry_limit": 1, "from_email": "crm-sync@localhost"}),
    }


def _api_servers(stack: ExitStack, stores: dict, secrets_: dict[str, str]) -> dict:
    from crm_sync.simulators.callcenter import CallCenterServer
    from crm_sync.simulators.im import ImServer
    from crm_sync.simulators.ticketing import Faults, TicketingServer

    # the demo's faults: a real desk answers 429 now and then
    return {
        "ticketing": stack.enter_context(TicketingServer(stores["ticketing"], token=secrets_["token"],
                                                         faults=Faults(rate_limit_every=7))),
        "im": stack.enter_context(ImServer(stores["im"], api_key=secrets_["im_key"],
                                           faults=Faults(rate_limit_every=11))),
        "callcenter": stack.enter_context(CallCenterServer(stores["callcenter"], login=secrets_["cc_login"],
                                                           password=secrets_["cc_password"])),
    }


# ----------------------------------------------------------------- comparison ---------------

def crm_contents(dsn: str) -> dict[str, Counter]:
    """Every `crm` table as a multiset of rows: surrogate numbers (sequence defaults) left out, run ids and
    the timestamps the pipeline writes when it acts (a `now()` default, `PIPELINE_TIMES`) as present/absent."""
    from psycopg2 import sql

    with db.connection(dsn) as conn, conn.cursor() as cur:
        cur.execute("""select c.table_name, c.column_name, c.data_type, coalesce(c.column_default, '')
                       from information_schema.columns c
                       join information_schema.tables t using (table_schema, table_name)
                       where c.table_schema = 'crm' and t.table_type = 'BASE TABLE'
                       order by c.table_name, c.ordinal_position""")
        columns: dict[str, list] = {}
        for table, column, data_type, default in cur.fetchall():
            columns.setdefault(table, []).append((column, data_type, default))
        contents = {}
        for table, cols in columns.items():
            exprs = []
            for column, data_type, default in cols:
                ident = sql.Identifier(column)
                if "nextval(" in default:
                    continue
                if column.endswith("run_id") or (data_type.startswith("timestamp")
                                                 and ("now()" in default or column in PIPELINE_TIMES)):
                    exprs.append(sql.SQL("({} is not null)").format(ident))
                else:
                    exprs.append(sql.SQL("{}::text").format(ident))
            cur.execute(sql.SQL("select {} from crm.{}").format(sql.SQL(", ").join(exprs), sql.Identifier(table)))
            contents[table] = Counter(cur.fetchall())
    return contents


RUN_FIGURES = ("state", "interval_start", "interval_end", "extract_since", "rows_extracted", "rows_mapped",
               "rows_loaded", "rows_rejected", "ids_linked", "ids_merged", "ids_review", "ids_new", "reconcile_ok")


def run_figures(dsn: str) -> dict[str, dict]:
    """Each source's newest `sync.run_log` row: its window and its counts (not its run id, times or API calls:
    the simulators' rate limits fall on other requests in the two runs)."""
    with db.connection(dsn) as conn, conn.cursor() as cur:
        cur.execute(f"""select distinct on (source) source, {', '.join(RUN_FIGURES)} from sync.run_log
                        order by source, started_at desc""")
        return {row[0]: dict(zip(RUN_FIGURES, row[1:])) for row in cur.fetchall()}


def compare(celery: dict[str, Counter], reference: dict[str, Counter]) -> list[str]:
    """One line per table whose rows differ, with a few rows only one side has."""
    diffs = []
    for table in sorted(set(celery) | set(reference)):
        a, b = celery.get(table, Counter()), reference.get(table, Counter())
        if a == b:
            continue
        only_a, only_b = list((a - b).elements()), list((b - a).elements())
        diffs.append(f"crm.{table}: {sum(a.values())} rows after the Celery run, {sum(b.values())} after the "
                     f"reference; {len(only_a)} only in the Celery CRM (e.g. {only_a[:2]}), "
                     f"{len(only_b)} only in the reference (e.g. {only_b[:2]})")
    return diffs


# ----------------------------------------------------------------- the run ------------------

class CeleryTest:
    def __init__(self, args):
        self.args = args
        self.admin_dsn = os.environ.get("CRM_SYNC_TEST_DSN") or DEFAULT_DSN
        self.broker = os.environ.get("CRM_SYNC_CELERY_BROKER") or DEFAULT_BROKER
        if "://" not in self.admin_dsn:
            raise SystemExit("CRM_SYNC_TEST_DSN must be a URL (postgresql://user@host:port/database)")
        self.tag = uuid.uuid4().hex[:8]
        self.prefix = f"crm_test_celery_{self.tag}"
        self.names = {"airflow": f"{self.prefix}_airflow", "crm": self.prefix, "reference": f"{self.prefix}_ref",
                      "erp": f"{self.prefix}_erp", "finance": f"{self.prefix}_fin"}
        self.queue = f"crm_sync_{self.tag}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"crm-celery-{self.tag}-"))
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self.sessions = Sessions(self.logs)
        self.host = socket.gethostname()
        self.worker_names = {w: f"{w}@{self.host}" for w in WORKERS}
        self.reference: dict[str, dict] = {}
        self.reference_error: str | None = None
        self.stopping = threading.Event()
        self.started = time.monotonic()

    def say(self, message: str) -> None:
        print(f"  [{time.monotonic() - self.started:4.0f}s] {message}", flush=True)

    # ---- setup
    def prepare(self, stack: ExitStack) -> None:
        from crm_sync.simulators import callcenter, erp, finance, im, people, spreadsheet, ticketing
        from crm_sync.simulators.smtp_outbox import OutboxServer

        # Airflow's own schema takes a minute or more: it is created while the sources are seeded
        db.ensure_database(self.admin_dsn, self.names["airflow"])
        self.api_port = _free_port()
        self.celery_settings = self._celery_settings()
        self.sessions.start("db-migrate", [demo._airflow_bin(), "db", "migrate"],
                            demo.airflow_env({}, extra=self.celery_settings), finishes=True)

        self.include = copy_include(self.tmp, fast_http=HTTP_SOURCES)
        self.configs = {name: load_source_file(self.include / "sources" / f"{name}.yaml") for name in SOURCES}
        self.logical_date = datetime.now(timezone.utc).replace(microsecond=0)
        ends = {name: demo.interval_end(cfg, self.logical_date) for name, cfg in self.configs.items()}
        pool = people.generate_people(self.args.people, SEED)

        for key in ("crm", "reference"):
            db.ensure_database(self.admin_dsn, self.names[key])
            db.migrate_as_owner(db.with_database(self.admin_dsn, self.names[key]))
        erp_dsn = _seed_database(self.admin_dsn, self.names["erp"], erp, pool, ends["erp"] - timedelta(minutes=5))
        finance_dsn = _seed_database(self.admin_dsn, self.names["finance"], finance, pool,
                                     ends["finance"] - timedelta(minutes=5))
        # the landing folder is consumed (files are archived), so each run reads its own copy of it
        landing = self.tmp / "landing-celery"
        landing.mkdir()
        spreadsheet.write_landing(landing, pool, seed=SEED, now=ends["spreadsheet"] - timedelta(minutes=1), files=6)
        shutil.copytree(landing, self.tmp / "landing-reference")
        stores = {"ticketing": ticketing.TicketingStore, "im": im.ImStore, "callcenter": callcenter.CallCenterStore}
        stores = {name: kind.generate(pool, seed=SEED, now=ends[name] - timedelta(minutes=5))
                  for name, kind in stores.items()}
        secrets_ = {key: secrets.token_urlsafe(16) for key in ("token", "im_key", "cc_login", "cc_password")}
        smtp = stack.enter_context(OutboxServer(self.tmp / "outbox"))
        apis = _api_servers(stack, stores, secrets_)
        reference_apis = _api_servers(stack, copy.deepcopy(stores), secrets_)

        def dsn(key):
            return db.with_database(self.admin_dsn, self.names[key])

        celery_connections = least_privilege(
            _connections(dsn("crm"), erp_dsn, finance_dsn, landing, apis, smtp.port, secrets_), self.include)
        self.celery_env = demo.airflow_env(celery_connections, extra=self.celery_settings)
        self.celery_env["PYTHONPATH"] = os.pathsep.join([str(HERE), self.celery_env["PYTHONPATH"]])  # worker_hostname
        # the reference reads the sources as the same readers (already least-privileged, so left as they are:
        # a second ensure_reader would change their passwords); `dagstack.airflow_env` swaps its CRM login
        self.reference_connections = {
            **_connections(dsn("reference"), erp_dsn, finance_dsn, self.tmp / "landing-reference", reference_apis,
                           smtp.port, secrets_),
            "erp_src": celery_connections["erp_src"], "finance_src": celery_connections["finance_src"]}

    def _celery_settings(self) -> dict[str, str]:
        return {
            "AIRFLOW_HOME": str(self.tmp / "airflow-celery"),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.api_port}/execution/",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "worker_hostname.hostname",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": _sqlalchemy_url(self.admin_dsn, self.names["airflow"],
                                                                   "postgresql+psycopg2"),
            "AIRFLOW__CELERY__BROKER_URL": self.broker,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + _sqlalchemy_url(self.admin_dsn, self.names["airflow"],
                                                                       "postgresql"),
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.args.concurrency),
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.queue,   # this run's workers take this run's tasks only
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",   # triggered runs only: no scheduled run on unpause
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{self.api_port}",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(24),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),  # the scheduler signs, the api-server checks
            "CRM_SYNC_INCLUDE_DIR": str(self.tmp / "include"),
            "CRM_SYNC_RETRY_DELAY_SECONDS": "1",
        }

    def wait_for_migration(self) -> None:
        code = self.sessions.procs["db-migrate"].wait()
        if code != 0:
            raise Failure(f"airflow db migrate failed (exit {code}):\n{tail(self.logs / 'db-migrate.log')}")

    # ---- the Celery stack
    def start_stack(self) -> None:
        airflow = demo._airflow_bin()
        env = self.celery_env
        self.sessions.start("api-server", [airflow, "api-server", "--apps", "execution", "-H", "127.0.0.1",
                                           "-p", str(self.api_port), "-w", "1"], env)
        self.sessions.start("scheduler", [airflow, "scheduler"], env)
        self.sessions.start("dag-processor", [airflow, "dag-processor"], env)
        for worker, name in self.worker_names.items():
            self.sessions.start(worker, [airflow, "celery", "worker", "--celery-hostname", f"{worker}@%h",
                                         "--queues", self.queue, "--concurrency", str(self.args.concurrency),
                                         "--skip-serve-logs", "--without-gossip", "--without-mingle"],
                                {**env, "CRM_SYNC_CELERY_WORKER_HOSTNAME": name})

    def wait_for_stack(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        dag_ids = [cfg.dag_id for cfg in self.configs.values()]
        while True:
            self.sessions.check_alive()
            parsed = self.metadata("select dag_id from serialized_dag where dag_id = any(%s)", (dag_ids,))
            if _port_open(self.api_port) and len({r[0] for r in parsed}) == len(dag_ids):
                return
            if time.monotonic() > deadline:
                raise Failure(f"the stack was not ready after {timeout:.0f}s (api-server port open: "
                              f"{_port_open(self.api_port)}, DAGs parsed: {sorted(r[0] for r in parsed)}); "
                              f"dag-processor log:\n{tail(self.logs / 'dag-processor.log')}")
            time.sleep(2)

    def metadata(self, statement: str, params=()) -> list[tuple]:
        import psycopg2

        try:
            with db.connection(db.with_database(self.admin_dsn, self.names["airflow"])) as conn, \
                    conn.cursor() as cur:
                cur.execute(statement, params)
                return cur.fetchall()
        except psycopg2.errors.UndefinedTable:
            return []

    def drive(self) -> dict[str, dict]:
        """Trigger the DAGs through `driver.py`; {dag_id: {run_id, state, seconds}}."""
        spec = {"dag_ids": [self.configs[s].dag_id for s in SOURCES], "logical_date": self.logical_date.isoformat(),
                "order": "concurrent" if self.args.concurrent else "sequential", "timeout_s": self.args.timeout}
        runs: dict[str, dict] = {}
        with (self.logs / "driver.log").open("w") as log:
            proc = subprocess.Popen([sys.executable, str(HERE / "driver.py"), json.dumps(spec)], env=self.celery_env,
                                    stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
            self.sessions.procs["driver"] = proc      # stopped with the stack
            self.sessions.finishing.add("driver")
            for line in proc.stdout:
                if not line.startswith(EVENT):
                    log.write(line)
                    continue
                event = json.loads(line[len(EVENT):])
                if event["event"] == "triggered":
                    runs[event["dag_id"]] = {"run_id": event["run_id"], "t0": time.monotonic()}
                    self.say(f"{event['dag_id']}: triggered ({event['run_id']})")
                elif event["event"] == "finished":
                    run = runs[event["dag_id"]]
                    run.update(state=event["state"], seconds=time.monotonic() - run["t0"])
                    self.say(f"{event['dag_id']}: {event['state']} after {run['seconds']:.0f}s")
                elif event["event"] == "timeout":
                    self.say(f"timed out after {self.args.timeout}s waiting for {', '.join(event['pending'])}")
                self.sessions.check_alive()
            code = proc.wait()
        if code != 0 and not runs:
            raise Failure(f"driver.py failed (exit {code}):\n{tail(self.logs / 'driver.log')}")
        return runs

    # ---- the reference run
    def run_reference(self) -> None:
        """`airflow dags test` of every source in order, with the integration tests' Airflow home
        (`dagstack.airflow_env`: SQLite metadata, migrated once per machine) and their CRM login swap."""
        try:
            env = airflow_env(self.reference_connections, self.include)
        except Exception as exc:
            self.reference_error = f"the reference's Airflow environment failed: {exc}"
            return
        for name in SOURCES:
            if self.stopping.is_set():
                return
            cfg = self.configs[name]
            t0 = time.monotonic()
            code = demo.run_dag(cfg.dag_id, self.logical_date, env,
                                self.logs / f"reference-{cfg.dag_id}.log")
            self.reference[cfg.dag_id] = {"exit": code, "seconds": time.monotonic() - t0}

    # ---- checks
    def check(self, runs: dict[str, dict]) -> tuple[list[str], list[str]]:
        """(failures, summary lines)."""
        failures, lines = [self.reference_error] if self.reference_error else [], []
        dag_ids = [self.configs[s].dag_id for s in SOURCES]
        ti = self.metadata("""select dag_id, coalesce(hostname, ''), state, count(*) from task_instance
                              where dag_id = any(%s) group by 1, 2, 3""", (dag_ids,))
        per_dag: dict[str, Counter] = {}
        per_worker: Counter = Counter()
        for dag_id, hostname, state, n in ti:
            per_dag.setdefault(dag_id, Counter())[hostname] += n
            per_worker[hostname] += n
            if state != "success":
                failures.append(f"{dag_id}: {n} task instance(s) {state} on {hostname or 'no worker'}")
        lines.append(f"  {'dag':<24} {'celery':<8} {'time':>5}  "
                     + "  ".join(f"{w:>7}" for w in WORKERS) + f"  {'reference':<9} {'time':>5}")
        for dag_id in dag_ids:
            run, ref = runs.get(dag_id, {}), self.reference.get(dag_id, {})
            state = run.get("state", "not run")
            if state != "success":
                failures.append(f"{dag_id}: the Celery run is {state}; task logs under "
                                f"{self.tmp / 'airflow-celery' / 'logs'}")
            if ref.get("exit") != 0:
                failures.append(f"{dag_id}: the reference run (airflow dags test) exited {ref.get('exit', 'never')}; "
                                f"log: {self.logs / ('reference-' + dag_id + '.log')}")
            counts = per_dag.get(dag_id, Counter())
            ref_state = "ok" if ref.get("exit") == 0 else f"exit {ref.get('exit', '-')}"
            lines.append(f"  {dag_id:<24} {state:<8} {run.get('seconds', 0):>4.0f}s  "
                         + "  ".join(f"{counts[self.worker_names[w]]:>7}" for w in WORKERS)
                         + f"  {ref_state:<9} {ref.get('seconds', 0):>4.0f}s")
        strangers = sorted(set(per_worker) - set(self.worker_names.values()))
        if strangers:
            failures.append(f"task instances recorded hosts other than the two workers: {strangers}")
        idle = [name for name in self.worker_names.values() if not per_worker[name]]
        if idle:
            failures.append(f"no task instance ran on {', '.join(idle)} "
                            f"(task instances per host: {dict(per_worker)})")
        lines.append("  task instances per worker: "
                     + ", ".join(f"{name} {per_worker[name]}" for name in self.worker_names.values()))

        figures = {k: run_figures(db.with_database(self.admin_dsn, self.names[k])) for k in ("crm", "reference")}
        for source in SOURCES:
            mine, theirs = figures["crm"].get(source), figures["reference"].get(source)
            if mine is None or mine["state"] != "success":
                failures.append(f"{source}: sync.run_log of the Celery run says {mine and mine['state']}")
            elif mine != theirs:
                failures.append(f"{source}: the run's figures differ (Celery {mine}, reference {theirs})")
        lines.append("  per source (Celery run; same window and figures as the reference unless listed below): "
                     + ", ".join(f"{s} {figures['crm'].get(s, {}).get('rows_extracted', 0)} extracted/"
                                 f"{figures['crm'].get(s, {}).get('rows_loaded', 0)} loaded" for s in SOURCES))
        celery, reference = (crm_contents(db.with_database(self.admin_dsn, self.names[k])) for k in ("crm", "reference"))
        diffs = compare(celery, reference)
        rows = sum(sum(c.values()) for c in celery.values())
        customers = sum(celery.get("customer", Counter()).values())
        if not customers:
            failures.append("the Celery run's CRM has no customer at all")
        failures.extend(diffs)
        lines.append(f"  CRM after the Celery run vs the reference: {len(celery)} crm tables, {rows} rows "
                     f"({customers} customers) — {'identical' if not diffs else f'{len(diffs)} table(s) differ'}")
        return failures, lines

    # ---- teardown
    def cleanup(self) -> None:
        self.stopping.set()
        self.sessions.stop()
        _kill_descendants()   # a reference `airflow dags test` still running after a failure
        for database in self.names.values():
            try:
                db.drop_database(self.admin_dsn, database)
            except Exception as exc:
                print(f"  could not drop database {database}: {exc}", file=sys.stderr)
        _drop_logins(self.admin_dsn, self.prefix)
        if self.broker.startswith(("redis://", "rediss://")):
            try:
                import redis

                client = redis.from_url(self.broker)
                keys = [self.queue, *client.scan_iter(match=f"_kombu.binding*{self.queue}")]
                client.delete(*keys)
            except Exception as exc:
                print(f"  could not remove the queue {self.queue} from the broker: {exc}", file=sys.stderr)


def _free_port() -> int:
    from crm_sync.simulators.apiserver import free_port

    return free_port()


def _kill_descendants() -> None:
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        _signal(child.pid, signal.SIGKILL)
    psutil.wait_procs(children, timeout=5)


def _drop_logins(admin_dsn: str, prefix: str) -> None:
    """Drop the login roles this run created (`<prefix>_..._loader`, `..._reader`), once their databases are gone."""
    from psycopg2 import sql

    with db.connection(admin_dsn) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("select rolname from pg_roles where rolname like %s", (prefix.replace("_", r"\_") + r"\_%",))
            for (role,) in cur.fetchall():
                try:
                    cur.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(role)))
                except Exception as exc:
                    print(f"  could not drop role {role}: {exc}", file=sys.stderr)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--people", type=int, default=300, help="size of the sample population (default 300)")
    parser.add_argument("--concurrency", type=int, default=2, help="task slots per Celery worker (default 2)")
    parser.add_argument("--concurrent", action="store_true",
                        help="trigger every DAG at once (the CRM may then differ from the sequential reference: "
                             "which source creates a customer first decides merges)")
    parser.add_argument("--timeout", type=int, default=1800,
                        help="seconds to wait for the Celery runs, and again for the reference runs (default 1800)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    run = CeleryTest(args)
    os.environ["AIRFLOW_HOME"] = str(run.tmp / "airflow-harness")   # this process's own Airflow imports
    print(f"make test-celery: {len(SOURCES)} source DAGs on CeleryExecutor with {len(WORKERS)} workers "
          f"(PostgreSQL {db.redact_dsn(run.admin_dsn)}, broker {db.redact_dsn(run.broker)}, run {run.tag})", flush=True)
    ok = False
    try:
        with ExitStack() as stack:
            run.say("creating the databases, seeding the sample sources …")
            run.prepare(stack)
            run.say("reference runs (airflow dags test) started; waiting for `airflow db migrate` of the stack …")
            reference = threading.Thread(target=run.run_reference, name="reference", daemon=True)
            run.reference_started = time.monotonic()
            reference.start()
            run.wait_for_migration()
            run.say("starting api-server, scheduler, dag-processor and two Celery workers …")
            run.start_stack()
            run.wait_for_stack()
            run.say("stack ready, DAGs parsed")
            runs = run.drive()
            run.say("Celery runs done; waiting for the reference runs")
            reference.join(timeout=max(0.0, run.reference_started + args.timeout - time.monotonic()))
            if reference.is_alive():
                raise Failure(f"the reference runs did not finish within {args.timeout}s")
            failures, lines = run.check(runs)
        print("\n".join(["", *lines]))
        for failure in failures:
            print(f"FAIL {failure}")
        ok = not failures
    except Failure as exc:
        print(f"FAIL {exc}")
    except Exception:
        print("FAIL the harness itself broke:")
        traceback.print_exc()
    finally:
        run.cleanup()
        if ok:
            shutil.rmtree(run.tmp, ignore_errors=True)
        else:
            print(f"  logs kept in {run.logs} (Airflow's task logs under {run.tmp / 'airflow-celery' / 'logs'})")
    seconds = time.monotonic() - run.started
    print(f"make test-celery: {'passed' if ok else 'FAILED'} in {seconds:.0f}s "
          f"(databases {run.prefix}* and the run's processes are gone)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
