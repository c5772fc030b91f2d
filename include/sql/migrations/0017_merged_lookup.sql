-- Issue 11: the resolve stage reads each master candidate's live customer — the customer its link
-- points at, or the one that customer was merged into. Joining crm.customer for it cost one random
-- heap page per candidate (an hourly run at a million customers reads ~465,000 candidates: 457,000
-- page reads of 720,000 in its candidate query). Merged customers are few: this index holds only
-- them, so "was it merged, and into whom" is a probe of a small, cached index that finds nothing for
-- almost every candidate (`identity/master.py::_LIVE`). Runs on PostgreSQL 15 to 18.
create index customer_merged_idx on crm.customer (customer_id) include (merged_into) where merged_into is not null;
