"""Two sources' DAG runs may carry the same run id (`scheduled__<date>`, or manual runs triggered
together, as `make test-celery` does): each resolve must still see the other source's records as
master candidates. Found by `make test-celery`, where every DAG run had one run id and the
second source matched nothing."""
from __future__ import annotations

from tests.test_identity_pipeline import ERP_1, TICKETING_1, customer_of, run


def test_a_source_matches_another_source_loaded_under_the_same_run_id(fresh_dsn):
    from crm_sync import db

    run(fresh_dsn, "erp", "scheduled__2025-03-02T00:00:00+00:00", ERP_1)
    result = run(fresh_dsn, "ticketing", "scheduled__2025-03-02T00:00:00+00:00", TICKETING_1)
    assert result.merged >= 2, result
    conn = db.connect(fresh_dsn)
    try:
        with conn.cursor() as cur:
            assert customer_of(cur, "erp", "C1") == customer_of(cur, "ticketing", "U1")
            assert customer_of(cur, "erp", "C6") == customer_of(cur, "ticketing", "U6")
    finally:
        conn.close()
