"""What a failed task's log shows: crm-sync's lines, not Great Expectations' INFO chatter."""
from __future__ import annotations

import logging

from crm_sync import tasks
from crm_sync.quality.validate import _run_gx, load_suite_doc


def _gx_info_lines(caplog) -> list[str]:
    import pandas as pd

    frame = pd.DataFrame({"source_pk": ["O1", "O2"], "source_customer_id": ["C1", None], "amount": [1.5, -2],
                          "currency": ["CNY", "XYZ"], "order_date": ["2026-01-01", None]})
    with caplog.at_level(logging.INFO):
        _run_gx(frame, load_suite_doc("order"), "orders")
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("great_expectations") and r.levelno < logging.WARNING]


def test_validation_writes_no_library_info_lines_to_the_task_log(caplog):
    # as a fresh worker process finds them after importing GX (other tests may have quieted them already)
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in {n.split(".")[0] for n in tasks._CHATTY}:
            logging.getLogger(name).setLevel(logging.NOTSET)
    logging.getLogger("great_expectations").setLevel(logging.INFO)
    noisy = _gx_info_lines(caplog)
    caplog.clear()
    tasks.quiet_libraries()  # after GX's import, as tasks.validate_stream calls it
    assert _gx_info_lines(caplog) == []
    # the check can fail: unquieted, GX does log at INFO (else this test would prove nothing)
    assert noisy, "GX logged nothing at INFO; the quieting check above proves nothing"
