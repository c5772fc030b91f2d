-- Issue 11: an hourly run checks its records and their master candidates (half a million at a million
-- customers) for stewards' decisions. Decided review items are few against that: the resolve stage
-- reads them all through this index and matches them in memory (`identity/master.py::_decided_items`)
-- instead of two index probes per record. Runs on PostgreSQL 15 to 18.
create index review_item_decided_idx on crm.review_item (review_id) where status <> 'open';
