-- Deletes (issue 9): a source record the source no longer holds is soft-deleted, never removed, so
-- its history and provenance stay readable and a key that comes back is revived by the next load.
--   deleted_at / deleted_run_id on every target of a source record: when and by which run.
--   crm.customer.deleted_at: every source record of the golden record is deleted (and no steward
--   override keeps it); the golden fields are recomputed from what is left.
alter table crm.source_customer add column deleted_at timestamptz, add column deleted_run_id text;
alter table crm.sales_order add column deleted_at timestamptz, add column deleted_run_id text;
alter table crm.ticket add column deleted_at timestamptz, add column deleted_run_id text;
alter table crm.interaction add column deleted_at timestamptz, add column deleted_run_id text;
alter table crm.invoice add column deleted_at timestamptz, add column deleted_run_id text;
alter table crm.payment add column deleted_at timestamptz, add column deleted_run_id text;
alter table crm.contract add column deleted_at timestamptz, add column deleted_run_id text;
alter table crm.customer add column deleted_at timestamptz;

-- reconcile counts a run's deletes per source: served by these partial indexes (deletes are rare)
create index source_customer_deleted_idx on crm.source_customer (source, deleted_run_id) where deleted_at is not null;
create index sales_order_deleted_idx on crm.sales_order (source, deleted_run_id) where deleted_at is not null;
create index ticket_deleted_idx on crm.ticket (source, deleted_run_id) where deleted_at is not null;
create index interaction_deleted_idx on crm.interaction (source, deleted_run_id) where deleted_at is not null;
create index invoice_deleted_idx on crm.invoice (source, deleted_run_id) where deleted_at is not null;
create index payment_deleted_idx on crm.payment (source, deleted_run_id) where deleted_at is not null;
create index contract_deleted_idx on crm.contract (source, deleted_run_id) where deleted_at is not null;

-- how many keys a full snapshot listed for the stream (null: the extract listed none, so nothing
-- is deleted by snapshot)
alter table sync.stream_account add column snapshot_keys bigint;
