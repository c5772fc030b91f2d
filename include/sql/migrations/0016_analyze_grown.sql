-- Issue 11: a load leaves the CRM tables with statistics that no longer describe them — a first load
-- turns empty tables into a million rows — and autovacuum may be off on the server, or minutes
-- behind. The hourly run after it is then planned against tables the planner believes empty.
-- After each load the loader calls this function: it ANALYZEs the crm tables never analysed or
-- grown by more than `growth` since (an hourly 1 % leaves them alone). ANALYZE needs the table's
-- owner on PostgreSQL 15 and 16, so the function runs as its owner (crm_owner, sync.apply_privileges)
-- and only the loader may call it. Runs on PostgreSQL 15 to 18.
create or replace function sync.analyze_grown(growth real default 0.2) returns setof text
language plpgsql security definer set search_path = pg_catalog, pg_temp as $fn$
declare
    t record;
begin
    for t in
        select c.relname from pg_class c
        where c.relnamespace = 'crm'::regnamespace and c.relkind = 'r'
          and pg_relation_size(c.oid) > 8 * current_setting('block_size')::int
          and (c.reltuples < 0
               or pg_relation_size(c.oid) / current_setting('block_size')::int > (1 + growth) * c.relpages)
        order by c.relname
    loop
        execute format('analyze crm.%I', t.relname);
        return next t.relname;
    end loop;
end $fn$;
revoke all on function sync.analyze_grown(real) from public;
grant execute on function sync.analyze_grown(real) to crm_loader;
select sync.apply_privileges();
