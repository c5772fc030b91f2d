-- Issue 11: the master's match features stored, not rebuilt on every run. An hourly run compares
-- its records with master candidates (about eight per record); normalising those candidates again
-- (names through OpenCC and pypinyin, phones through phonenumbers) was half of an hourly resolve.
-- The resolve stage stages each accepted record's engine features with the version of what they
-- are a function of (`features.match_version`: normalisers, fields, blocking rules, libraries);
-- the load stores them next to the identity input they were built from. A candidate whose stored
-- version is not the current one (never stored, or the config or a normaliser changed) is
-- normalised in the run as before, and stored again when its own source next loads it.
-- `match_features` is the engine columns joined by U+001F (`features.stored_features`).
-- Runs on PostgreSQL 15 to 18 (adding nullable columns without a default rewrites nothing).
alter table crm.source_identity add column match_version text, add column match_features text;
alter table stg.identity_input add column match_version text, add column match_features text;
