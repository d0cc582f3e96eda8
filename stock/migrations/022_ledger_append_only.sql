-- The ledger is append-only for every role but its owner (the migrator, tooling/access.py): the
-- runtime role got UPDATE and DELETE with its other table rights (default privileges) and
-- loses them here. A rename keeps these grants. Under a single-role setup (the owner is the
-- runtime role, e.g. an external server) there is nobody to revoke from.
REVOKE UPDATE, DELETE, TRUNCATE ON movement FROM PUBLIC;
DO $$
DECLARE
    grantee text;
BEGIN
    FOR grantee IN
        SELECT DISTINCT a.grantee::regrole::text
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = to_regclass('movement') AND a.grantee <> 0 AND a.grantee <> c.relowner
          AND a.privilege_type IN ('UPDATE', 'DELETE', 'TRUNCATE')
    LOOP
        EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON movement FROM %s', grantee);
    END LOOP;
END $$;
