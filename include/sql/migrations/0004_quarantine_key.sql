-- "Was this staged row quarantined?" (quarantine.ACCEPTED) is asked once per staged row by map,
-- load and reconcile: with the key in the index it is one index probe, not a scan of every
-- quarantined row of the run (at 100,000 rows with thousands quarantined, minutes instead of ms).
create index quarantine_run_key_idx on sync.quarantine (run_id, source, stream, source_pk);
drop index sync.quarantine_run_idx;
