"""What the integration modules share: real `airflow dags test` runs against a module's stack."""
from __future__ import annotations

import shutil
import uuid
from datetime import datetime
from pathlib import Path

import yaml

from crm_sync import db, demo

ROOT = Path(__file__).resolve().parents[1]


class DagStack:
    """The module's sample sources, CRM database and Airflow environment; attributes given as keywords."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def run(self, source: str, logical_date: datetime | None = None) -> int:
        cfg = self.configs[source]
        log = self.tmp / f"{cfg.dag_id}-{uuid.uuid4().hex[:6]}.log"
        code = demo.run_dag(cfg.dag_id, logical_date or self.now, self.env, log)
        self.last_log = log
        return code

    def crm(self, sql: str, params=()):
        conn = db.connect(self.dsn)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            conn.close()

    def one(self, sql: str, params=()):
        return self.crm(sql, params)[0][0]

    def last_run(self, source: str) -> dict:
        """The source's newest `sync.run_log` row as a dict."""
        conn = db.connect(self.dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("select * from sync.run_log where source = %s order by started_at desc limit 1", (source,))
                return dict(zip([d[0] for d in cur.description], cur.fetchone()))
        finally:
            conn.close()


def copy_include(tmp: Path, fast_http: tuple[str, ...]) -> Path:
    """A copy of `include/` whose HTTP sources in `fast_http` retry in seconds, not minutes (config is data)."""
    include = tmp / "include"
    shutil.copytree(ROOT / "include", include)
    for name in fast_http:
        path = include / "sources" / f"{name}.yaml"
        doc = yaml.safe_load(path.read_text())
        doc["http"].update({"max_attempts": 3, "backoff_seconds": 0.05, "timeout_seconds": 5})
        path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))
    return include


def airflow_env(connections: dict[str, str], include: Path) -> dict[str, str]:
    """The child Airflow processes' environment: the tests' own metadata DB and the copied include/."""
    env = demo.airflow_env(connections, extra={
        "AIRFLOW_HOME": str(ROOT / ".local" / "airflow-test"),
        "CRM_SYNC_INCLUDE_DIR": str(include),
        "CRM_SYNC_RETRY_DELAY_SECONDS": "1",
    })
    demo.ensure_airflow_db(env)
    return env
