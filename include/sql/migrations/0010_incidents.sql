-- One incident = one message (issue 10): a source is either healthy or has one open incident.
-- The first failure opens it and alerts; failures while it stays open only count; the first run
-- of the source that succeeds resolves it and sends one "resolved" message.
create table sync.incident (
    incident_id      bigserial primary key,
    source           text not null,
    state            text not null check (state in ('open', 'resolved')),
    kind             text not null,          -- blocked | failed | deadline
    opened_run_id    text not null,
    opened_task      text,
    opened_at        timestamptz not null default now(),
    error            text,                   -- masked, as alerted
    last_run_id      text not null,
    last_at          timestamptz not null default now(),
    failures         int not null default 1, -- failed tasks seen while open (the first included)
    runs             int not null default 1, -- distinct failed runs while open
    resolved_run_id  text,
    resolved_at      timestamptz
);
create unique index incident_one_open_idx on sync.incident (source) where state = 'open';
create index incident_source_idx on sync.incident (source, opened_at desc);
