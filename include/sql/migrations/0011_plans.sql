-- Issue 11: the hourly path costs O(batch), not O(master) (tests/test_incremental_plans.py reads the plans).
--
-- The stewards' queue: decided review items the master does not reflect yet. The load reads it every
-- run (`identity/apply.py`: pending 'same' decisions, `_mark_applied`); without this index that is a
-- scan of every review item ever raised. The planner prices a scan of it by its own size, the queue's.
create index review_item_pending_idx on crm.review_item (review_id)
    where applied_run_id is null and status <> 'open';

-- A merge moves the customers already merged into an absorbed one (lineage stays one hop deep):
-- `update crm.customer … where merged_into = <absorbed>` is a lookup here, not a scan of the master.
create index customer_merged_into_idx on crm.customer (merged_into) where merged_into is not null;
