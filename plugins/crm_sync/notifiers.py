"""Airflow notifiers crm-sync sends through: e-mail (the smtp provider's `SmtpNotifier`) and a
Slack-compatible webhook (`WebhookNotifier`, JSON `{"text": ...}` POSTed through an Airflow HTTP
connection, so the webhook's secret URL lives in the connection store, never in code).

Imported only when an alert is sent (never at DAG parse time).
"""
from __future__ import annotations

from typing import Any

from airflow.sdk import BaseNotifier


class WebhookNotifier(BaseNotifier):
    """POST `{"text": subject + body}` to the HTTP connection `http_conn_id` (path: its `endpoint` extra)."""

    template_fields = ()

    def __init__(self, *, http_conn_id: str, subject: str, body: str, timeout_seconds: float = 10) -> None:
        super().__init__()
        self.http_conn_id = http_conn_id
        self.subject = subject
        self.body = body
        self.timeout_seconds = timeout_seconds

    def payload(self) -> dict[str, Any]:
        # Slack renders *bold* and ``` blocks; other receivers (Teams/Mattermost-compatible hooks) read `text`
        return {"text": f"*{self.subject}*\n```\n{self.body}\n```"}

    def notify(self, context: Any) -> None:
        from airflow.providers.http.hooks.http import HttpHook
        from airflow.sdk import BaseHook

        extra = BaseHook.get_connection(self.http_conn_id).extra_dejson or {}
        hook = HttpHook(method="POST", http_conn_id=self.http_conn_id)
        hook.run(endpoint=extra.get("endpoint", ""), json=self.payload(),
                 extra_options={"timeout": self.timeout_seconds, "check_response": True})
