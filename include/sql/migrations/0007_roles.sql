-- Least privilege (issue 9): who may do what in crm, stg and sync. Three NOLOGIN group roles; the
-- login roles that use them are made by whoever sets up an environment (crm_sync.db.ensure_login).
--   crm_owner     owns the schemas and everything in them (staging tables excepted, see below) and
--                 the database; migrations run as it: an administrator's session `SET ROLE crm_owner`
--                 (crm_sync.db.migrate_as_owner), so later migrations create objects it owns.
--   crm_loader    what the pipeline runs as: USAGE on crm, stg and sync; SELECT, INSERT, UPDATE and
--                 DELETE on their tables (sync.schema_version only SELECT); USAGE on their sequences;
--                 CONNECT and TEMPORARY on the database (the stages build temp tables); no CREATE in
--                 any schema. It owns the stg tables: the stages ANALYZE them after bulk writes, and
--                 ANALYZE needs the owner on PostgreSQL 15 and 16 (MAINTAIN exists from 17 only).
--   crm_reporter  SELECT on crm and sync.
-- Default privileges give objects created by later migrations (as crm_owner) the same grants. A
-- new stg table is analysable by the loader on PostgreSQL 17+ through them; on 15/16 end the
-- migration with `select sync.apply_privileges()`, which hands stg tables to crm_loader.
-- Roles are cluster-wide and many databases share a server: they are created only when missing,
-- and only a migrator with CREATEROLE can create them (crm_sync.db.ensure_group_roles does it for
-- a migrator that cannot). Runs on PostgreSQL 15 to 18.

do $$
declare
    wanted text;
begin
    foreach wanted in array array['crm_owner', 'crm_loader', 'crm_reporter'] loop
        continue when exists (select from pg_roles where rolname = wanted);
        if not (select rolsuper or rolcreaterole from pg_roles where rolname = current_user) then
            raise exception 'role % does not exist and % cannot create roles', wanted, current_user
                using hint = 'create it as an administrator first: crm_sync.db.ensure_group_roles(conn)';
        end if;
        begin
            execute format('create role %I nologin', wanted);
        exception when duplicate_object or unique_violation then
            null;  -- created meanwhile by the migration of another database on this server
        end;
    end loop;
    -- the owner hands the staging tables to the loader (ALTER ... OWNER TO needs membership)
    if not pg_has_role('crm_owner', 'crm_loader', 'member') then
        begin
            grant crm_loader to crm_owner;
        exception when unique_violation then
            null;
        end;
    end if;
end $$;

-- Idempotent, and safe to run again: any object of crm, stg or sync that a superuser created (a
-- database migrated before this migration, or a later migration applied without SET ROLE) goes to
-- its owner role, and the loader and the reporter get their grants on it.
create or replace function sync.apply_privileges() returns void
language plpgsql set search_path = pg_catalog as $fn$
declare
    obj record;
    owner_oid oid := 'crm_owner'::regrole;
    loader_oid oid := 'crm_loader'::regrole;
    database text := current_database();
begin
    if (select datdba from pg_database where datname = database) <> owner_oid then
        begin
            execute format('alter database %I owner to crm_owner', database);
        exception when insufficient_privilege then
            raise notice 'database % stays owned by its owner: % may not hand it to crm_owner', database, current_user;
        end;
    end if;
    for obj in select nspname from pg_namespace
               where nspname in ('crm', 'stg', 'sync') and nspowner <> owner_oid loop
        execute format('alter schema %I owner to crm_owner', obj.nspname);
    end loop;
    -- ALTER ... OWNER TO checks that the new owner may create in the schema
    grant create on schema stg to crm_loader;
    for obj in
        select c.oid::regclass as rel, n.nspname,
               case c.relkind when 'v' then 'view' when 'm' then 'materialized view'
                              when 'f' then 'foreign table' when 'S' then 'sequence' else 'table' end as kind,
               case when n.nspname = 'stg' and c.relkind in ('r', 'p') then loader_oid else owner_oid end as target
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname in ('crm', 'stg', 'sync') and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S')
          -- a serial or identity sequence follows its table
          and not (c.relkind = 'S' and exists (select from pg_depend d where d.classid = 'pg_class'::regclass
                                                and d.objid = c.oid and d.deptype in ('a', 'i')))
    loop
        if (select relowner from pg_class where oid = obj.rel) <> obj.target then
            execute format('alter %s %s owner to %s', obj.kind, obj.rel, obj.target::regrole);
        end if;
    end loop;
    revoke create on schema stg from crm_loader;
    for obj in select p.oid::regprocedure as routine from pg_proc p join pg_namespace n on n.oid = p.pronamespace
               where n.nspname in ('crm', 'stg', 'sync') and p.proowner <> owner_oid loop
        execute format('alter routine %s owner to crm_owner', obj.routine);
    end loop;
    for obj in select t.oid::regtype as type, t.typtype from pg_type t join pg_namespace n on n.oid = t.typnamespace
               where n.nspname in ('crm', 'stg', 'sync') and t.typowner <> owner_oid
                 and (t.typtype in ('d', 'e', 'r')
                      or t.typtype = 'c' and (select relkind from pg_class where oid = t.typrelid) = 'c') loop
        execute format('alter %s %s owner to crm_owner', case obj.typtype when 'd' then 'domain' else 'type' end,
                       obj.type);
    end loop;

    if has_database_privilege(database, 'TEMPORARY WITH GRANT OPTION') then
        execute format('grant connect, temporary on database %I to crm_loader', database);
        execute format('grant connect on database %I to crm_reporter', database);
    end if;
    grant usage on schema crm, stg, sync to crm_loader;
    grant select, insert, update, delete on all tables in schema crm, sync to crm_loader;
    revoke insert, update, delete, truncate on sync.schema_version from crm_loader;  -- the migrations' record
    grant usage on all sequences in schema crm, stg, sync to crm_loader;
    grant usage on schema crm, sync to crm_reporter;
    grant select on all tables in schema crm, sync to crm_reporter;
end $fn$;
revoke all on function sync.apply_privileges() from public;

select sync.apply_privileges();

alter default privileges for role crm_owner in schema crm, stg, sync
    grant select, insert, update, delete on tables to crm_loader;
alter default privileges for role crm_owner in schema crm, stg, sync
    grant usage on sequences to crm_loader;
alter default privileges for role crm_owner in schema crm, sync
    grant select on tables to crm_reporter;
do $$
begin
    if current_setting('server_version_num')::int >= 170000 then  -- MAINTAIN: ANALYZE without owning
        execute 'alter default privileges for role crm_owner in schema stg grant maintain on tables to crm_loader';
    end if;
end $$;
