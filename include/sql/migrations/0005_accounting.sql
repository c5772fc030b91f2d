-- Nothing lost, nothing stuck (issue 9): per-stream accounting, resumable extracts, deletes.

-- A quarantine row either rejects its key for the run (the default: the key does not load) or only
-- records a version that was not kept (an older duplicate of a key inside one batch): that one must
-- not stop the newest version from loading.
alter table sync.quarantine add column blocks_key boolean not null default true;

-- Where every row of the source went, per run and stream:
--   source_rows = received, received = staged + extract-quarantined (superseded duplicates included),
--   staged = loaded + unchanged + quarantined later (held facts included) + deleted (tombstones).
-- `source_rows` / `source_checksum` are read from the source itself (a count and key checksum in
-- the snapshot the extract read, or the API's total) — null where the source cannot say.
create table sync.stream_account (
    run_id           text not null,
    source           text not null,
    stream           text not null,
    window_since     timestamptz,
    window_until     timestamptz,
    late_since       timestamptz,          -- the late-row sweep: rows before this were due in earlier runs
    source_rows      bigint,
    source_checksum  numeric,
    received         bigint not null default 0,
    received_checksum numeric,
    staged           bigint not null default 0,
    quarantined      bigint not null default 0,
    superseded       bigint not null default 0,
    future_clamped   bigint not null default 0,
    tombstones       bigint not null default 0,
    loaded           bigint,
    unchanged        bigint,
    deleted          bigint,
    lost             bigint,
    late             bigint,
    partial          boolean not null default false,
    updated_at       timestamptz not null default now(),
    primary key (run_id, source, stream)
);

-- Where paging stopped: an Airflow retry of the same run resumes after the last committed page;
-- a run that spent its call budget leaves status 'partial' and the next run resumes from here.
create table sync.extract_checkpoint (
    source        text not null,
    stream        text not null,
    run_id        text not null,
    status        text not null check (status in ('paging', 'partial', 'done')),
    state         jsonb,
    window_since  timestamptz,
    window_until  timestamptz,
    pages         int not null default 0,
    records       bigint not null default 0,
    calls         int not null default 0,
    updated_at    timestamptz not null default now(),
    primary key (source, stream)
);

-- Keys of a full snapshot (every key the source holds, whatever its cursor) and tombstones of an
-- incremental stream: the load soft-deletes target rows from them.
create unlogged table stg.snapshot_key (
    run_id     text not null,
    source     text not null,
    stream     text not null,
    source_pk  text not null,
    primary key (run_id, source, stream, source_pk)
);
create unlogged table stg.tombstone (
    run_id        text not null,
    source        text not null,
    stream        text not null,
    source_pk     text not null,
    cursor_value  timestamptz,
    primary key (run_id, source, stream, source_pk)
);

alter table sync.run_log add column rows_unchanged bigint not null default 0;
alter table sync.run_log add column rows_deleted bigint not null default 0;
alter table sync.run_log add column late_rows bigint not null default 0;
alter table sync.run_log add column partial boolean not null default false;
