-- Issue 11: the size of the master as data, exact and cheap. Term-frequency weights divide by the
-- number of source records in the master; `count(*)` reads the master whole on every hourly run,
-- and the planner's estimate (pg_class.reltuples) moves with autovacuum's timing, so two runs of
-- the same data could score a pair differently (seen by `make test-celery`: Celery and a
-- LocalExecutor run of the same data stored different scores). Statement-level triggers with
-- transition tables keep one counter exact at the cost of one row update per statement.
-- Runs on PostgreSQL 15 to 18.
create table crm.master_count (
    singleton          boolean primary key default true check (singleton),
    source_identities  bigint not null
);
insert into crm.master_count (source_identities) select count(*) from crm.source_identity;

create function crm.count_source_identity() returns trigger language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        update crm.master_count set source_identities = source_identities + (select count(*) from added);
    elsif tg_op = 'DELETE' then
        update crm.master_count set source_identities = source_identities - (select count(*) from removed);
    else  -- TRUNCATE
        update crm.master_count set source_identities = 0;
    end if;
    return null;
end $$;

create trigger source_identity_count_insert after insert on crm.source_identity
    referencing new table as added for each statement execute function crm.count_source_identity();
create trigger source_identity_count_delete after delete on crm.source_identity
    referencing old table as removed for each statement execute function crm.count_source_identity();
create trigger source_identity_count_truncate after truncate on crm.source_identity
    for each statement execute function crm.count_source_identity();
