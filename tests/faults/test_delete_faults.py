"""Deletes: a full snapshot that no longer holds some keys soft-deletes them; one missing too many brakes.

After healing, every row the ERP still holds is accounted for (none lost, none duplicated) and no
live CRM row is left for a key the ERP dropped (`ghosts`).
"""
from __future__ import annotations

import pytest

from faults.harness import DAY, END

pytestmark = pytest.mark.integration

FIRST = (END - DAY, END)
NEXT = (END, END + DAY)


def drop_customers(src, share: float) -> list[str]:
    """Delete `share` of the ERP's customers (with their orders) and as many stray orders; their keys."""
    [(n,)] = src.execute("select count(*) from src_erp.customers")
    gone = [k for (k,) in src.execute("select customer_no from src_erp.customers order by md5(customer_no) limit %s",
                                      (max(1, int(n * share)),))]
    src.execute("delete from src_erp.orders where customer_no = any(%s)", (gone,))
    src.execute("delete from src_erp.customers where customer_no = any(%s)", (gone,))
    return gone


def test_a_full_snapshot_missing_some_keys_soft_deletes_them(case, fault_counts):
    src = case.sql_source("erp")
    erp = case.pipeline("erp")
    assert erp.run(*FIRST).ok
    gone = drop_customers(src, 0.03)
    orders_gone = [k for (k,) in case.crm("select order_id from crm.sales_order where source_customer_id = any(%s)",
                                          (gone,))]

    run = erp.run(*NEXT)

    assert run.ok, run.error_text
    deleted = case.crm("select source_id, deleted_run_id from crm.source_customer where deleted_at is not null")
    assert sorted(deleted) == sorted((k, run.run_id) for k in gone)
    assert case.crm("select count(*) from crm.sales_order where deleted_at is not null")[0][0] == len(orders_gone)
    assert run.outputs["reconcile.check"]["deleted"] == len(gone) + len(orders_gone)
    acc = case.account("erp", [(None, NEXT[1])])
    fault_counts(acc)
    assert (acc.lost, acc.duplicated, acc.ghosts) == (0, 0, 0), str(acc)


def test_a_snapshot_missing_more_than_max_delete_share_stops_before_load(case, fault_counts):
    src = case.sql_source("erp")
    erp = case.pipeline("erp")
    assert erp.run(*FIRST).ok
    before = case.snapshot("erp")
    gone = drop_customers(src, 0.3)  # a truncated export looks like this

    run = erp.run(*NEXT)

    assert run.failed_task == "load.publish" and not run.retryable
    assert run.error_text.startswith("DeleteBrakeError: source 'erp': delete brake — stream 'customers': "
                                     f"{len(gone)} of "), run.error_text
    assert "more than max_delete_share 10%" in run.error_text and '{"allow_deletes": true}' in run.error_text
    assert case.snapshot("erp") == before and case.crm("select count(*) from crm.source_customer "
                                                      "where deleted_at is not null")[0][0] == 0
    assert case.run_log(run.run_id, "erp")["state"] == "blocked"
    # on-call checked the ERP: the rows really are gone; a manual run releases the brake once
    released = erp.run(*NEXT, run_type="manual", params={"allow_deletes": True})
    assert released.ok, released.error_text
    assert case.crm("select count(*) from crm.source_customer where deleted_at is not null")[0][0] == len(gone)
    acc = case.account("erp", [(None, NEXT[1])])
    fault_counts(acc)
    assert (acc.lost, acc.duplicated, acc.ghosts) == (0, 0, 0), str(acc)
