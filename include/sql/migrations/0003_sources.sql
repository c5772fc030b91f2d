-- crm-sync: every source system. Interactions (chat sessions, calls), invoices, payments and
-- contracts hang off the golden customer like orders and tickets; facts whose customer is not
-- known yet are held and retried; spreadsheets are processed once per checksum.
-- The columns of each fact table are declared in plugins/crm_sync/entities.py (a test checks
-- they match). Runs on PostgreSQL 15 to 18.

-- how a fact found its customer: the id of a customer record of `ref_source`, or a phone number
alter table crm.sales_order add column ref_by text not null default 'source_id';
alter table crm.sales_order add column ref_source text;
alter table crm.ticket add column ref_by text not null default 'source_id';
alter table crm.ticket add column ref_source text;

-- a customer created for a fact whose customer is unknown (a source with `orphans: stub`)
alter table crm.customer add column is_stub boolean not null default false;
alter table crm.customer add column stub_ref text;
create unique index customer_stub_ref_idx on crm.customer (stub_ref) where stub_ref is not null;

-- ---------------------------------------------------------------- facts -----------
create table crm.interaction (
    source              text not null,
    interaction_id      text not null,
    source_customer_id  text not null,
    ref_by              text not null default 'source_id',
    ref_source          text,
    customer_id         uuid references crm.customer (customer_id),
    channel             text,
    kind                text,
    direction           text,
    started_at          timestamptz,
    ended_at            timestamptz,
    duration_seconds    integer,
    message_count       integer,
    summary             text,
    tags                jsonb,
    agent               text,
    queue               text,
    recording_url       text,
    status              text,
    source_updated_at   timestamptz,
    row_hash            text not null,
    loaded_run_id       text not null,
    primary key (source, interaction_id)
);
create index interaction_customer_idx on crm.interaction (customer_id);

create table crm.invoice (
    source              text not null,
    invoice_id          text not null,
    source_customer_id  text not null,
    ref_by              text not null default 'source_id',
    ref_source          text,
    customer_id         uuid references crm.customer (customer_id),
    issued_on           date,
    amount              numeric(18, 2),
    tax_amount          numeric(18, 2),
    total_amount        numeric(18, 2),
    currency            text not null,
    status              text,
    source_updated_at   timestamptz,
    row_hash            text not null,
    loaded_run_id       text not null,
    primary key (source, invoice_id)
);
create index invoice_customer_idx on crm.invoice (customer_id);

create table crm.payment (
    source              text not null,
    payment_id          text not null,
    source_customer_id  text not null,
    ref_by              text not null default 'source_id',
    ref_source          text,
    customer_id         uuid references crm.customer (customer_id),
    invoice_ref         text,
    paid_on             date,
    amount              numeric(18, 2),
    currency            text not null,
    method              text,
    source_updated_at   timestamptz,
    row_hash            text not null,
    loaded_run_id       text not null,
    primary key (source, payment_id)
);
create index payment_customer_idx on crm.payment (customer_id);

create table crm.contract (
    source              text not null,
    contract_id         text not null,
    source_customer_id  text not null,
    ref_by              text not null default 'source_id',
    ref_source          text,
    customer_id         uuid references crm.customer (customer_id),
    title               text,
    signed_on           date,
    starts_on           date,
    ends_on             date,
    amount              numeric(18, 2),
    currency            text not null,
    status              text,
    source_updated_at   timestamptz,
    row_hash            text not null,
    loaded_run_id       text not null,
    primary key (source, contract_id)
);
create index contract_customer_idx on crm.contract (customer_id);

-- ---------------------------------------------------------------- staging ---------
create unlogged table stg.mapped_interaction (
    run_id              text not null,
    source              text not null,
    stream              text not null,
    source_pk           text not null,
    source_customer_id  text,
    channel             text,
    kind                text,
    direction           text,
    started_at          timestamptz,
    ended_at            timestamptz,
    duration_seconds    integer,
    message_count       integer,
    summary             text,
    tags                jsonb,
    agent               text,
    queue               text,
    recording_url       text,
    status              text,
    source_updated_at   timestamptz,
    row_hash            text not null,
    primary key (run_id, source, stream, source_pk)
);

create unlogged table stg.mapped_invoice (
    run_id              text not null,
    source              text not null,
    stream              text not null,
    source_pk           text not null,
    source_customer_id  text,
    issued_on           date,
    amount              numeric(18, 2),
    tax_amount          numeric(18, 2),
    total_amount        numeric(18, 2),
    currency            text,
    status              text,
    source_updated_at   timestamptz,
    row_hash            text not null,
    primary key (run_id, source, stream, source_pk)
);

create unlogged table stg.mapped_payment (
    run_id              text not null,
    source              text not null,
    stream              text not null,
    source_pk           text not null,
    source_customer_id  text,
    invoice_ref         text,
    paid_on             date,
    amount              numeric(18, 2),
    currency            text,
    method              text,
    source_updated_at   timestamptz,
    row_hash            text not null,
    primary key (run_id, source, stream, source_pk)
);

create unlogged table stg.mapped_contract (
    run_id              text not null,
    source              text not null,
    stream              text not null,
    source_pk           text not null,
    source_customer_id  text,
    title               text,
    signed_on           date,
    starts_on           date,
    ends_on             date,
    amount              numeric(18, 2),
    currency            text,
    status              text,
    source_updated_at   timestamptz,
    row_hash            text not null,
    primary key (run_id, source, stream, source_pk)
);

-- ---------------------------------------------------------------- bookkeeping -----
-- A fact whose customer is not known yet: its mapped row, kept until a later run of any source
-- loads the customer it points at (then it is loaded and `released_run_id` set).
create table sync.held_fact (
    source           text not null,
    stream           text not null,
    entity           text not null,
    source_pk        text not null,
    ref_by           text not null,
    ref_source       text,
    ref_value        text not null,
    row_data         jsonb not null,     -- the stg.mapped_<entity> row as to_jsonb
    row_hash         text not null,
    held_run_id      text not null,      -- the run that held (this version of) it
    held_since       timestamptz not null default now(),
    released_run_id  text,
    released_at      timestamptz,
    primary key (source, stream, source_pk)
);
create index held_fact_pending_idx on sync.held_fact (ref_by, ref_value) where released_run_id is null;

-- Files of a `kind: files` source: each checksum is processed once.
create table sync.file_ledger (
    source     text not null,
    stream     text not null,
    checksum   text not null,          -- sha256 of the file bytes
    file_name  text not null,
    run_id     text not null,          -- the run that read it last
    state      text not null check (state in ('staged', 'loaded', 'rejected')),
    rows       integer,
    reason     text,
    seen_at    timestamptz not null default now(),
    done_at    timestamptz,
    primary key (source, stream, checksum)
);

alter table sync.run_log add column facts_held bigint not null default 0;
alter table sync.run_log add column facts_released bigint not null default 0;

-- orders and tickets loaded before this migration point at a customer record of their own source
update crm.sales_order set ref_source = source where ref_source is null;
update crm.ticket set ref_source = source where ref_source is null;
