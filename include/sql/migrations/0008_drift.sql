-- Drift baselines (issue 10): what each run measured, and what drifted from its baseline.
-- plugins/crm_sync/quality/drift.py writes both; the baseline of a figure is the median and MAD of
-- its values over the last N successful runs (sync.run_log.state = 'success') of the same source,
-- stream, metric, column and run type. Runs on PostgreSQL 15 to 18.

-- One figure of one run: measured at validate (before the load) per stream, at reconcile for the
-- whole run (stream '*'). run_type keeps baselines apart: 'nightly' = a full refresh or the
-- late-row sweep, 'hourly' = a regular incremental window.
create table sync.drift_metric (
    run_id        text not null,
    source        text not null,
    stream        text not null,
    metric        text not null,      -- rows | null_rate | distinct | amount_sum | merge_rate | review_rate
                                      -- | new_rate | rejection_rate | duration_s
    column_name   text not null default '',   -- null_rate, distinct, amount_sum: the column measured
    run_type      text not null check (run_type in ('hourly', 'nightly')),
    full_refresh  boolean not null default false,   -- the window had no lower bound
    value         numeric not null,
    measured_at   timestamptz not null default now(),
    primary key (run_id, source, stream, metric, column_name)
);
create index drift_metric_series_idx on sync.drift_metric (source, stream, metric, column_name, run_type);

-- A deviation beyond its bound (kind 'metric'), or drift reported by another stage (kind 'schema':
-- the extract's schema contract). `alerted` turns true once the alert path has sent it.
create table sync.drift_event (
    event_id      bigserial primary key,
    run_id        text not null,
    source        text not null,
    stream        text not null,
    kind          text not null,
    metric        text not null default '',
    column_name   text not null default '',
    run_type      text,
    severity      text not null check (severity in ('warning', 'critical')),
    value         numeric,
    median        numeric,
    mad           numeric,
    history       int,                -- successful runs the baseline was computed from
    z             double precision,   -- robust z; null when no z bound applied, 'Infinity' for a constant series
    bound         text,               -- which bound was crossed, as the message says it
    message       text not null,      -- masked
    detail        jsonb,
    alerted       boolean not null default false,
    created_at    timestamptz not null default now()
);
create index drift_event_run_idx on sync.drift_event (run_id, source, stream);
create index drift_event_unalerted_idx on sync.drift_event (source, created_at) where not alerted;
