"""Paged, rate-limit-aware reads from an HTTP API with bearer-token auth and cursor pagination.

The desk bills per call and answers 429 when pushed, so: one request per page, `Retry-After`
honoured (capped), 5xx and timeouts retried with exponential backoff and jitter, and any other
4xx failed at once (retrying a bad token only costs money). When the attempts run out the error
names the source, stream, endpoint and last status; nothing has been loaded at that point.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterator

from crm_sync.config import HttpOptions

log = logging.getLogger(__name__)


class SourceUnavailable(RuntimeError):
    """The source could not be read after every retry; nothing was loaded."""


class SourceRejected(RuntimeError):
    """The source refused the request (4xx other than 429): retrying would not help."""


@dataclass
class CallStats:
    calls: int = 0
    by_status: dict[str, int] = field(default_factory=dict)

    def record(self, status: str) -> None:
        self.calls += 1
        self.by_status[status] = self.by_status.get(status, 0) + 1


def _retry_after(value: str | None, default: float) -> float:
    try:
        return max(0.0, float(value)) if value is not None else default
    except ValueError:
        return default


def fetch_pages(
    session,
    base_url: str,
    token: str | None,
    endpoint: str,
    *,
    source: str,
    stream: str,
    since: datetime | None,
    until: datetime,
    options: HttpOptions,
    stats: CallStats,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[list[dict]]:
    """Yield each page's records for `since <= updated_at < until`."""
    import requests

    url = base_url.rstrip("/") + "/" + endpoint.lstrip("/")
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    params: dict[str, str | int] = {"updated_before": until.isoformat(), "limit": options.page_size}
    if since is not None:
        params["updated_since"] = since.isoformat()
    rng = random.Random()
    what = f"source '{source}' stream '{stream}': GET {endpoint}"
    while True:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = session.get(url, params=params, headers=headers, timeout=options.timeout_seconds)
            except (requests.Timeout, requests.ConnectionError) as exc:
                stats.record(type(exc).__name__)
                last = f"{type(exc).__name__}: {exc}"
            else:
                stats.record(str(response.status_code))
                if response.status_code == 200:
                    break
                last = f"HTTP {response.status_code} {response.reason}: {response.text[:200]}"
                if response.status_code == 429:
                    wait = min(_retry_after(response.headers.get("Retry-After"), options.backoff_seconds),
                               options.max_retry_after_seconds)
                    if attempt < options.max_attempts:
                        log.warning("%s rate limited (429); waiting %.1fs as Retry-After says", what, wait)
                        sleep(wait)
                        continue
                elif 400 <= response.status_code < 500:
                    hint = " — check the API token (password) of the Airflow connection" if response.status_code in (401, 403) else ""
                    raise SourceRejected(f"{what} was refused: {last}{hint}")
            if attempt >= options.max_attempts:
                raise SourceUnavailable(
                    f"{what} failed after {attempt} attempts; last error: {last}. "
                    "Nothing was loaded and the watermark did not move; the task will retry."
                )
            wait = options.backoff_seconds * (2 ** (attempt - 1)) * (0.5 + rng.random() / 2)
            log.warning("%s attempt %d failed (%s); retrying in %.1fs", what, attempt, last, wait)
            sleep(wait)
        body = response.json()
        records = body.get("data")
        if not isinstance(records, list):
            raise SourceRejected(f"{what}: response has no 'data' list (keys: {sorted(body)[:10]})")
        yield records
        cursor = body.get("next_cursor")
        if not cursor:
            return
        params["cursor"] = cursor
