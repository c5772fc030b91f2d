-- Quarantine you can work with, and quality reports (issue 10). Runs on PostgreSQL 15 to 18.
--
-- Every quarantine row gets a stable rule name (`reason_code`): the expectation for validate rows,
-- `<stage>.<rule>` for the others (`extract.null_cursor`, `map.cast`, `load.customer_not_known`),
-- and the field's value as it may be shown (`masked_value`, written by crm_sync.quarantine.add;
-- reasons are masked when they are read, which costs too much per row on the write path).
-- A row's life cycle:
--   open       rejected by its run (the default; what stewards and expiry look at)
--   released   a steward asked for the key to be read again: the next run of the source widens its
--              extract window to cover it (crm_sync.quarantine.release_window) and settles it
--   resolved   a later run loaded the key (it came back fixed, released or not)
--   retried    released, re-read by a later run and rejected again (that run has its own open row)
--   discarded  a steward gave the row up (who and why in status_by / status_note); never deleted
--   expired    open (or released and never re-read) longer than the expiry age; on-call was told
-- Rows leave only through housekeeping (crm_sync.quarantine.purge) once they are settled.

alter table sync.quarantine
    add column reason_code   text,
    add column masked_value  text,
    add column status        text not null default 'open'
        constraint quarantine_status_check
        check (status in ('open', 'released', 'resolved', 'retried', 'discarded', 'expired')),
    add column status_by     text,
    add column status_note   text,
    add column status_at     timestamptz,
    add column retry_run_id  text;          -- the run that re-read (settled) a released key

-- The rule of a row its writer did not name: the expectation, else the stage and what the stable
-- beginning of the reason says. Writers may set reason_code themselves (quarantine.Reject).
create or replace function sync.quarantine_reason_code(stage text, expectation text, reason text)
returns text language sql immutable as $$
    select case
        when coalesce(expectation, '') <> '' then expectation
        when stage = 'extract' then 'extract.' || case
            when reason like 'superseded:%' then 'superseded'
            when reason like 'primary key is missing%' then 'missing_key'
            when reason like 'primary key is not usable%' then 'bad_key'
            when reason like 'primary key is % characters long%' then 'long_key'
            when reason like '%NUL character%' then 'nul_character'
            when reason like 'cursor field is missing%' then 'null_cursor'
            when reason like 'cursor field is not a timestamp%' then 'bad_cursor'
            when reason like '%not a JSON object%' then 'not_an_object'
            when reason like '%key columns % are all empty%' then 'empty_key'
            else 'rejected' end
        when stage = 'map' then 'map.' || case
            when reason like '%identity field % expected text%' then 'identity_shape'
            when reason like '%characters long, more than%' then 'too_long'
            when reason like '%required field % is missing%' then 'required'
            when reason like '%NUL character%' then 'nul_character'
            when reason like '%mapped values%' then 'unmapped_value'
            when reason like '%too large for numeric%' or reason like '%out of the range%' then 'out_of_range'
            else 'cast' end
        when stage = 'load' then 'load.' || case
            when reason = 'customer not known yet' then 'customer_not_known'
            else 'rejected' end
        else coalesce(stage, 'unknown') || '.rejected'
    end
$$;

create or replace function sync.quarantine_fill_reason_code() returns trigger
language plpgsql as $$
begin
    if new.reason_code is null then
        new.reason_code := sync.quarantine_reason_code(new.stage, new.expectation, new.reason);
    end if;
    return new;
end $$;

-- Also fires for COPY: rows written by staging.copy_rows and by plain INSERTs (facts.py) alike.
create trigger quarantine_reason_code before insert on sync.quarantine
    for each row execute function sync.quarantine_fill_reason_code();

update sync.quarantine set reason_code = sync.quarantine_reason_code(stage, expectation, reason)
where reason_code is null;
alter table sync.quarantine alter column reason_code set not null;

-- What stewards, settling and expiry look at: the unsettled rows of a source.
create index quarantine_unsettled_idx on sync.quarantine (source, stream, source_pk)
    where status in ('open', 'released');

-- The steward's actions, append-only: a rerun of a stage replaces its run's quarantine rows, a
-- purge deletes settled ones; who released or discarded what, when and why stays here.
create table sync.quarantine_action (
    action_id      bigserial primary key,
    quarantine_id  bigint not null,        -- no foreign key: the row may be purged, the record stays
    action         text not null check (action in ('release', 'discard', 'expire')),
    source         text not null,
    run_id         text not null,
    stream         text not null,
    source_pk      text,
    reason_code    text not null,
    field          text,
    masked_value   text,
    acted_by       text not null,
    note           text,
    acted_at       timestamptz not null default now()
);
create index quarantine_action_source_idx on sync.quarantine_action (source, acted_at desc);

-- The quality report of a run (crm_sync.quality.report): where its HTML and JSON are, so the alert
-- and the DAG run note can link them, and the GX Data Docs page of each validated stream.
create table sync.quality_report (
    run_id      text not null,
    source      text not null,
    html_path   text not null,
    json_path   text not null,
    data_docs   jsonb not null default '{}'::jsonb,   -- stream -> HTML path of its GX Data Docs page
    failed      int not null default 0,               -- expectations and checks that failed
    quarantined bigint not null default 0,            -- distinct keys rejected by the run
    built_at    timestamptz not null default now(),
    primary key (run_id, source)
);
