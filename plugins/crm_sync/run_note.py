"""The DAG run note in the Airflow UI: the run's figures and the gate's decision, one glance per run.

A task cannot write the metadata database in Airflow 3, so the note goes through Airflow's public
REST API (`PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}?update_mask=note`) with the credentials of
the Airflow HTTP connection `airflow_api` (login/password of an Airflow user; a JWT is requested
from `/auth/token`). Without that connection (e.g. `airflow dags test`), nothing is sent.

Guarantees: `set_note()` never raises (a note is a courtesy, never the reason a task fails) and
the note is masked like every alert.
"""
from __future__ import annotations

import logging
from typing import Mapping

from crm_sync.masking import mask_text

log = logging.getLogger("crm_sync.run_note")

API_CONN_ID = "airflow_api"


def render(state: str, figures: Mapping, decision: str | None = None) -> str:
    """Markdown for the note: the state, what the gate decided, and the run's figures."""
    head = {"blocked": "⛔ BLOCKED by a quality gate — nothing loaded, watermark unchanged",
            "failed": "❌ FAILED — nothing of this run is half-loaded; see the alert",
            "success": "✅ loaded and reconciled", "partial": "◐ PARTIAL — loaded what it read; resumes next run"}
    lines = [f"**{head.get(state, state)}**"]
    if decision:
        lines += ["", decision]
    shown = [(k, v) for k, v in figures.items() if k != "top_quarantine_reasons" and v not in (None, "")]
    if shown:
        lines += ["", "| figure | value |", "|---|---|", *(f"| {k.replace('_', ' ')} | {v} |" for k, v in shown)]
    reasons = figures.get("top_quarantine_reasons") or []
    if reasons:
        lines += ["", "Top quarantine reasons:", *(f"- {r}" for r in reasons)]
    return mask_text("\n".join(lines))[:1000]   # Airflow stores at most 1000 characters of a note


def set_note(dag_id: str, run_id: str, note: str, *, conn_id: str = API_CONN_ID, timeout: float = 10) -> bool:
    """PATCH the run's note; True when Airflow accepted it."""
    try:
        import requests
        from airflow.sdk import BaseHook

        try:
            c = BaseHook.get_connection(conn_id)
        except Exception:  # noqa: BLE001 - no API connection configured: nothing to do
            log.info("no Airflow connection '%s': the run note is not set", conn_id)
            return False
        base = f"{c.schema or 'http'}://{c.host}{':' + str(c.port) if c.port else ''}".rstrip("/")
        token = requests.post(f"{base}/auth/token", json={"username": c.login, "password": c.password},
                              timeout=timeout)
        token.raise_for_status()
        from urllib.parse import quote

        response = requests.patch(
            f"{base}/api/v2/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}",
            params={"update_mask": "note"}, json={"note": note[:1000]}, timeout=timeout,
            headers={"Authorization": f"Bearer {token.json()['access_token']}"})
        response.raise_for_status()
        return True
    except Exception as exc:  # noqa: BLE001 - see module docstring
        log.warning("could not set the run note of %s %s: %s", dag_id, run_id,
                    mask_text(f"{type(exc).__name__}: {str(exc)[:200]}"))
        return False
