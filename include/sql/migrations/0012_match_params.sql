-- Issue 11: the resolve stage estimates nothing. m/u and the prior are estimated when the operator
-- asks (`crm-sync identity estimate [--source S]`: EM over a sample of the master) and stored here
-- with the time; every resolve run reads the latest estimate for its source (else for the whole
-- master, else the match config's values) and names the one it used in its log line and run figures.
-- Runs on PostgreSQL 15 to 18.
create table crm.match_params (
    params_id     bigserial primary key,
    config        text not null,              -- the match config's name (include/match/customer.yaml: customer)
    source        text,                       -- the source whose records were sampled; null: the whole master
    params        jsonb not null,             -- scoring.Params.to_dict: prior, and m/u per field and level
    matches_per_record double precision,      -- the estimate's prior times (sample records - 1): the prior of
                                              -- a run is matches_per_record / (its records - 1), as the config's
    records       bigint not null,            -- master records the estimate read
    stats         jsonb not null default '{}'::jsonb,   -- pairs sampled, EM sessions, seconds
    estimated_by  text not null,
    estimated_at  timestamptz not null default now()
);
-- the latest estimate of a config (per source): one index lookup per run
create index match_params_latest_idx on crm.match_params (config, source, estimated_at desc);
