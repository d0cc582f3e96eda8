#!/bin/sh
# First start of compose's PostgreSQL (docker-entrypoint-initdb.d): per service a migrator role
# that owns the database and runs the migrations, and a runtime role with DML only, also on the
# tables later migrations add (default privileges); the ledger's migration (stock 022) makes
# `movement` append-only for it. Passwords come from compose's required secrets.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v orders_pw="$ORDERS_DB_PASSWORD" -v orders_mpw="$ORDERS_MIGRATOR_PASSWORD" \
    -v stock_pw="$STOCK_DB_PASSWORD" -v stock_mpw="$STOCK_MIGRATOR_PASSWORD" <<'SQL'
CREATE ROLE orders LOGIN PASSWORD :'orders_pw';
CREATE ROLE orders_migrator LOGIN PASSWORD :'orders_mpw';
CREATE ROLE stock LOGIN PASSWORD :'stock_pw';
CREATE ROLE stock_migrator LOGIN PASSWORD :'stock_mpw';
CREATE DATABASE orders OWNER orders_migrator;
CREATE DATABASE stock OWNER stock_migrator;
REVOKE ALL ON DATABASE orders FROM PUBLIC;
REVOKE ALL ON DATABASE stock FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE orders TO orders;
GRANT CONNECT, TEMPORARY ON DATABASE stock TO stock;
\connect orders
ALTER SCHEMA public OWNER TO orders_migrator;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO orders;
ALTER DEFAULT PRIVILEGES FOR ROLE orders_migrator IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO orders;
ALTER DEFAULT PRIVILEGES FOR ROLE orders_migrator IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO orders;
\connect stock
ALTER SCHEMA public OWNER TO stock_migrator;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO stock;
ALTER DEFAULT PRIVILEGES FOR ROLE stock_migrator IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO stock;
ALTER DEFAULT PRIVILEGES FOR ROLE stock_migrator IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO stock;
SQL
