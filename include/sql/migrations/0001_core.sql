-- crm-sync core schema: the master (crm), per-run staging (stg) and bookkeeping (sync).
-- Money is NUMERIC, times are timestamptz. Runs on PostgreSQL 15 to 18.

create schema if not exists crm;
create schema if not exists stg;
create schema if not exists sync;

-- ---------------------------------------------------------------- master ----------
create table crm.customer (
    customer_id      uuid primary key,
    full_name        text,
    phone_e164       text,
    phone_kind       text,
    phone_ext        text,
    email            text,
    company          text,
    city             text,
    provenance       jsonb not null default '{}'::jsonb,   -- field -> {source, source_id, rule}
    merged_into      uuid references crm.customer (customer_id),
    first_run_id     text not null,
    last_run_id      text not null,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now()
);
create index customer_phone_idx on crm.customer (phone_e164) where phone_e164 is not null;
create index customer_email_idx on crm.customer (email) where email is not null;

-- what each source says about a customer, latest version per source record
create table crm.source_customer (
    source             text not null,
    source_id          text not null,
    customer_id        uuid not null references crm.customer (customer_id),
    full_name          text,
    name_key           text,
    phone_raw          text,
    phone_e164         text,
    phone_kind         text,
    phone_ext          text,
    email              text,
    company            text,
    city               text,
    source_created_at  timestamptz,
    source_updated_at  timestamptz,
    row_hash           text not null,
    loaded_run_id      text not null,
    primary key (source, source_id)
);
create index source_customer_customer_idx on crm.source_customer (customer_id);
create index source_customer_phone_idx on crm.source_customer (phone_e164) where phone_e164 is not null;
create index source_customer_email_idx on crm.source_customer (email) where email is not null;

-- (source system, source id) -> customer id, with how the link was made
create table crm.customer_link (
    source        text not null,
    source_id     text not null,
    customer_id   uuid not null references crm.customer (customer_id),
    match_rule    text not null,
    match_score   numeric,
    explanation   jsonb,
    linked_run_id text not null,
    linked_at     timestamptz not null default now(),
    primary key (source, source_id)
);
create index customer_link_customer_idx on crm.customer_link (customer_id);

create table crm.sales_order (
    source              text not null,
    order_id            text not null,
    source_customer_id  text not null,
    customer_id         uuid references crm.customer (customer_id),
    order_date          date,
    amount              numeric(18, 2) not null,
    currency            text not null,
    status              text,
    source_updated_at   timestamptz,
    row_hash            text not null,
    loaded_run_id       text not null,
    primary key (source, order_id)
);
create index sales_order_customer_idx on crm.sales_order (customer_id);

create table crm.ticket (
    source              text not null,
    ticket_id           text not null,
    source_customer_id  text not null,
    customer_id         uuid references crm.customer (customer_id),
    subject             text,
    status              text,
    priority            text,
    source_created_at   timestamptz,
    source_updated_at   timestamptz,
    row_hash            text not null,
    loaded_run_id       text not null,
    primary key (source, ticket_id)
);
create index ticket_customer_idx on crm.ticket (customer_id);

-- ---------------------------------------------------------------- staging ---------
-- Every stage reads and writes rows keyed by (run_id, source, stream): tasks share nothing else.
-- Unlogged: staging is rebuilt by rerunning the task, so WAL would only slow the hot path.
create unlogged table stg.extracted (
    run_id        text not null,
    source        text not null,
    stream        text not null,
    source_pk     text not null,
    cursor_value  timestamptz,
    payload       jsonb not null,
    primary key (run_id, source, stream, source_pk)
);

create unlogged table stg.resolved (
    run_id        text not null,
    source        text not null,
    stream        text not null,
    source_pk     text not null,
    customer_id   uuid not null,
    decision      text not null,         -- linked | merged | new
    match_rule    text not null,
    match_score   numeric,
    explanation   jsonb,
    full_name     text,
    name_key      text,
    phone_raw     text,
    phone_e164    text,
    phone_kind    text,
    phone_ext     text,
    email         text,
    email_valid   boolean,
    primary key (run_id, source, stream, source_pk)
);

create unlogged table stg.mapped_customer (
    run_id             text not null,
    source             text not null,
    stream             text not null,
    source_pk          text not null,
    customer_id        uuid not null,
    full_name          text,
    name_key           text,
    phone_raw          text,
    phone_e164         text,
    phone_kind         text,
    phone_ext          text,
    email              text,
    company            text,
    city               text,
    source_created_at  timestamptz,
    source_updated_at  timestamptz,
    row_hash           text not null,
    primary key (run_id, source, stream, source_pk)
);

create unlogged table stg.mapped_order (
    run_id              text not null,
    source              text not null,
    stream              text not null,
    source_pk           text not null,
    source_customer_id  text,
    order_date          date,
    amount              numeric(18, 2),
    currency            text,
    status              text,
    source_updated_at   timestamptz,
    row_hash            text not null,
    primary key (run_id, source, stream, source_pk)
);

create unlogged table stg.mapped_ticket (
    run_id              text not null,
    source              text not null,
    stream              text not null,
    source_pk           text not null,
    source_customer_id  text,
    subject             text,
    status              text,
    priority            text,
    source_created_at   timestamptz,
    source_updated_at   timestamptz,
    row_hash            text not null,
    primary key (run_id, source, stream, source_pk)
);

-- ---------------------------------------------------------------- bookkeeping -----
create table sync.run_log (
    run_id            text not null,
    source            text not null,
    dag_id            text not null,
    state             text not null default 'running',   -- running | success | failed | blocked
    interval_start    timestamptz,
    interval_end      timestamptz,
    extract_since     timestamptz,
    rows_extracted    bigint not null default 0,
    rows_mapped       bigint not null default 0,
    rows_loaded       bigint not null default 0,
    rows_rejected     bigint not null default 0,
    ids_linked        bigint not null default 0,
    ids_merged        bigint not null default 0,
    ids_review        bigint not null default 0,
    ids_new           bigint not null default 0,
    api_calls         bigint not null default 0,
    reconcile_ok      boolean,
    failed_task       text,
    error             text,
    started_at        timestamptz not null default now(),
    finished_at       timestamptz,
    primary key (run_id, source)
);
create index run_log_source_started_idx on sync.run_log (source, started_at desc);

create table sync.watermark (
    source         text not null,
    stream         text not null,
    cursor_value   timestamptz not null,
    cursor_pk      text,
    run_id         text not null,
    updated_at     timestamptz not null default now(),
    primary key (source, stream)
);

create table sync.quarantine (
    quarantine_id  bigserial primary key,
    run_id         text not null,
    source         text not null,
    stream         text not null,
    source_pk      text,
    stage          text not null,          -- extract | map | validate | load
    field          text,
    reason         text not null,
    expectation    text,
    payload        jsonb,
    created_at     timestamptz not null default now()
);
create index quarantine_run_idx on sync.quarantine (run_id, source, stream);

create table sync.dq_result (
    run_id         text not null,
    source         text not null,
    stream         text not null,
    expectation    text not null,
    column_name    text not null default '',
    severity       text not null,
    success        boolean not null,
    element_count  bigint,
    unexpected_count bigint,
    detail         jsonb,
    checked_at     timestamptz not null default now(),
    primary key (run_id, source, stream, expectation, column_name)
);

create table sync.reconciliation (
    run_id         text not null,
    source         text not null,
    stream         text not null,
    check_name     text not null,
    source_value   numeric,
    target_value   numeric,
    ok             boolean not null,
    checked_at     timestamptz not null default now(),
    primary key (run_id, source, stream, check_name)
);

-- survivorship: which source wins a golden field (higher first); written from the source YAML
create table sync.source_priority (
    source    text primary key,
    priority  int not null
);
