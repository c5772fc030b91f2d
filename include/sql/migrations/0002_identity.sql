-- crm-sync identity: what the engine needs from the live master, the review queue, merge lineage
-- and manual overrides of golden fields. Runs on PostgreSQL 15 to 18.

-- ---------------------------------------------------------------- master ----------
-- The identity evidence of each source record exactly as the engine reads it (raw columns, so a
-- retuned normaliser sees the same input the next run), with the stream that makes its record id
-- `source/stream/source_id`.
create table crm.source_identity (
    source         text not null,
    source_id      text not null,
    stream         text not null,
    name           text,
    phone          text,             -- every phone field of the record, joined by ' / '
    email          text,
    company        text,
    city           text,
    loaded_run_id  text not null,
    primary key (source, source_id)
);

-- Blocking-key values ('b:<rule>=<value>') and term values ('t:<field.attr>=<value>') of each
-- source record: candidate lookup for an incoming batch and term frequencies come from here.
create table crm.match_key (
    key        text not null,
    source     text not null,
    source_id  text not null,
    primary key (key, source, source_id)
);
create index match_key_record_idx on crm.match_key (source, source_id);

-- A pair of source records for a data steward. The pair is stored in one order
-- ((source, source_id) of a before b), so the unique key covers the unordered pair: never asked twice.
create table crm.review_item (
    review_id        bigserial primary key,
    source_a         text not null,
    stream_a         text not null,
    source_id_a      text not null,
    source_b         text not null,
    stream_b         text not null,
    source_id_b      text not null,
    customer_a       uuid,             -- their customers when the pair was raised
    customer_b       uuid,
    probability      numeric not null,
    reason           text not null,    -- review_band | strong:<field> | cannot_link
    explanation      jsonb not null default '{}'::jsonb,
    status           text not null default 'open' check (status in ('open', 'same', 'different')),
    decided_by       text,
    decided_at       timestamptz,
    note             text,
    applied_run_id   text,             -- the run that applied the decision to the master
    created_run_id   text not null,
    created_at       timestamptz not null default now(),
    check ((source_a, source_id_a) < (source_b, source_id_b)),
    check ((status = 'open') = (decided_at is null)),
    unique (source_a, source_id_a, source_b, source_id_b)
);
create index review_item_status_idx on crm.review_item (status) where status <> 'open' or applied_run_id is null;
create index review_item_b_idx on crm.review_item (source_b, source_id_b);

-- Lineage: an existing customer found to be the same person as another one.
create table crm.customer_merge (
    survivor     uuid not null references crm.customer (customer_id),
    absorbed     uuid not null references crm.customer (customer_id),
    run_id       text not null,
    rule         text not null,     -- engine | steward
    evidence     jsonb not null default '{}'::jsonb,
    merged_at    timestamptz not null default now(),
    primary key (absorbed, survivor, run_id)
);
create index customer_merge_survivor_idx on crm.customer_merge (survivor);

-- A steward's value for one golden field; wins where the field's survivorship rules say so.
create table crm.golden_override (
    customer_id  uuid not null references crm.customer (customer_id),
    field        text not null check (field in ('full_name', 'phone', 'email', 'company', 'city')),
    value        text not null,
    value_kind   text,              -- phone: mobile | landline | other, from the normaliser
    set_by       text not null,
    set_at       timestamptz not null default now(),
    primary key (customer_id, field)
);

-- ---------------------------------------------------------------- staging ---------
-- The resolve stage's identity outcome for one run, applied by the load in its transaction.
create unlogged table stg.identity_input (
    run_id     text not null,
    source     text not null,
    stream     text not null,
    source_pk  text not null,
    name       text,
    phone      text,
    email      text,
    company    text,
    city       text,
    primary key (run_id, source, stream, source_pk)
);

create unlogged table stg.match_key (
    run_id     text not null,
    source     text not null,
    stream     text not null,
    source_pk  text not null,
    key        text not null,
    primary key (run_id, source, stream, source_pk, key)
);

create unlogged table stg.review_pair (
    run_id       text not null,
    source       text not null,
    record_a     text not null,     -- engine record ids: source/stream/source_id
    record_b     text not null,
    probability  numeric not null,
    reason       text not null,
    explanation  jsonb,
    primary key (run_id, source, record_a, record_b)
);

create unlogged table stg.cluster_merge (
    run_id       text not null,
    source       text not null,
    survivor     uuid not null,
    absorbed     uuid not null,
    record_a     text,
    record_b     text,
    probability  numeric,
    explanation  jsonb,
    primary key (run_id, source, absorbed)
);
