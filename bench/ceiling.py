"""The ceiling: how many reservation transactions per second the same PostgreSQL server does with
nothing in front of it (pgbench, 16 clients), to put the system's settled orders/s in proportion.

One pgbench transaction is one order's hold, in the app's own tables (stock_item, hold
with its foreign key, outbox): lock the order's stock rows in key order,
add 1 to reserved and version, insert the hold lines and one outbox row, commit.
- uniform: 3 distinct skus out of 10,000 per transaction;
- hot: every transaction the same single sku (the flash sale's one row).
Then uniform once more with a NOTIFY trigger on the outbox (as the app had before), to show
what notifying costs."""

import asyncio
import glob
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

DATABASE = "bench_ceiling"
N_SKUS = 10_000

SCHEMA = f"""
CREATE TABLE stock_item (
    store_id text NOT NULL, sku text NOT NULL, on_hand integer NOT NULL,
    reserved integer NOT NULL DEFAULT 0, version bigint NOT NULL, updated_at timestamptz NOT NULL,
    PRIMARY KEY (store_id, sku),
    CHECK (reserved >= 0 AND reserved <= on_hand));
CREATE TABLE hold (
    order_id uuid NOT NULL, store_id text NOT NULL, sku text NOT NULL,
    quantity integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, store_id, sku),
    FOREIGN KEY (store_id, sku) REFERENCES stock_item (store_id, sku));
CREATE INDEX hold_item ON hold (store_id, sku);
CREATE TABLE outbox (
    id bigserial PRIMARY KEY, event_id uuid NOT NULL, event_type text NOT NULL,
    correlation_id text, request_id text, body jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('outbox', ''); RETURN NULL; END $$;
CREATE TRIGGER outbox_written AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION notify_outbox();
INSERT INTO stock_item
SELECT 'S1', 'SKU-' || lpad(i::text, 5, '0'), 1000000000, 0, 1, now()
FROM generate_series(1, {N_SKUS}) AS i;
"""

OUTBOX_ROW = ("INSERT INTO outbox (event_id, event_type, correlation_id, body) VALUES "
              "(gen_random_uuid(), 'AtualizarStatus', NULL, "
              "'{\"status\": \"EstoqueReservado\", \"attempt\": 1}'::jsonb);")


def _sku(var: str) -> str:
    return f"'SKU-' || lpad((:{var})::text, 5, '0')"


# b and c are offset from a by 1..4999 and 5000..9998 (mod 10,000): three distinct skus.
UNIFORM_SCRIPT = f"""\\set a random(1, {N_SKUS})
\\set b (:a + random(1, 4999) - 1) % {N_SKUS} + 1
\\set c (:a + random(5000, 9998) - 1) % {N_SKUS} + 1
BEGIN;
SELECT sku FROM stock_item WHERE store_id = 'S1' AND sku IN ({_sku('a')}, {_sku('b')}, {_sku('c')}) ORDER BY store_id, sku FOR UPDATE;
UPDATE stock_item SET reserved = reserved + 1, version = version + 1, updated_at = clock_timestamp() WHERE store_id = 'S1' AND sku IN ({_sku('a')}, {_sku('b')}, {_sku('c')});
INSERT INTO hold (order_id, store_id, sku, quantity) SELECT o, 'S1', s, 1 FROM gen_random_uuid() AS o, unnest(ARRAY[{_sku('a')}, {_sku('b')}, {_sku('c')}]) AS s;
{OUTBOX_ROW}
COMMIT;
"""

HOT_SCRIPT = f"""BEGIN;
SELECT sku FROM stock_item WHERE store_id = 'S1' AND sku = 'SKU-00001' FOR UPDATE;
UPDATE stock_item SET reserved = reserved + 1, version = version + 1, updated_at = clock_timestamp() WHERE store_id = 'S1' AND sku = 'SKU-00001';
INSERT INTO hold (order_id, store_id, sku, quantity) VALUES (gen_random_uuid(), 'S1', 'SKU-00001', 1);
{OUTBOX_ROW}
COMMIT;
"""


def pgbench_binary() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))
    return found[-1] if found else None


def parse_pgbench(output: str) -> dict[str, Any]:
    """tps, average latency, transactions and failures from pgbench's summary."""
    def number(pattern: str) -> float | None:
        match = re.search(pattern, output)
        return float(match.group(1)) if match else None

    return {
        "tps": number(r"tps = ([\d.]+) \(without initial connection time\)") or number(r"tps = ([\d.]+)"),
        "latency_avg_ms": number(r"latency average = ([\d.]+) ms"),
        "transactions": number(r"number of transactions actually processed: (\d+)"),
        "failed": number(r"number of failed transactions: (\d+)"),
    }


async def _fresh_database(admin_dsn: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
    await _execute(admin_dsn, SCHEMA)
    await _execute(admin_dsn, "VACUUM ANALYZE stock_item")


async def _execute(admin_dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(_with_db(admin_dsn, DATABASE))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _drop_database(admin_dsn: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    finally:
        await conn.close()


def _with_db(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


def _pgbench(binary: str, admin_dsn: str, script: str, seconds: int, clients: int, threads: int) -> dict[str, Any]:
    parts = urlsplit(admin_dsn)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reserve.sql"
        path.write_text(script)
        command = [binary, "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 5432),
                   "-U", parts.username or "postgres", "-c", str(clients), "-j", str(threads),
                   "-T", str(seconds), "-n", "-f", str(path), DATABASE]
        done = subprocess.run(command, env={"PGPASSWORD": parts.password or "", "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=seconds + 60, check=False)
        shown = [part if part != str(path) else "reserve.sql" for part in command]
    result = parse_pgbench(done.stdout)
    result["command"] = " ".join(shown)
    if done.returncode != 0 or result["tps"] is None:
        result["error"] = (done.stderr or done.stdout)[-800:]
    return result


def run_ceiling(admin_dsn: str, seconds: int = 10, clients: int = 16, threads: int = 2) -> dict[str, Any]:
    """pgbench, uniform then hot, in a database of its own that is dropped afterwards."""
    if urlsplit(admin_dsn).hostname not in ("127.0.0.1", "localhost"):
        return {"error": "the ceiling runs only against a local PostgreSQL"}
    binary = pgbench_binary()
    if binary is None:
        return {"error": "pgbench not found under /usr/lib/postgresql/*/bin"}
    asyncio.run(_fresh_database(admin_dsn))
    try:
        # The app's outbox has no NOTIFY trigger (migrations 002): the ceiling has none either.
        asyncio.run(_execute(admin_dsn, "DROP TRIGGER outbox_written ON outbox"))
        result = {
            "pgbench": binary, "clients": clients, "threads": threads, "seconds": seconds,
            "uniform": _pgbench(binary, admin_dsn, UNIFORM_SCRIPT, seconds, clients, threads),
            "hot": _pgbench(binary, admin_dsn, HOT_SCRIPT, seconds, clients, threads),
        }
        # A diagnostic, not a ceiling: what the outbox NOTIFY trigger the app had before cost.
        # NOTIFY takes a cluster-wide lock held through commit, so notifying commits go one by one.
        asyncio.run(_execute(admin_dsn, "CREATE TRIGGER outbox_written AFTER INSERT ON outbox "
                                        "FOR EACH STATEMENT EXECUTE FUNCTION notify_outbox()"))
        result["uniform_with_notify"] = _pgbench(binary, admin_dsn, UNIFORM_SCRIPT, seconds,
                                                 clients, threads)
        return result
    finally:
        asyncio.run(_drop_database(admin_dsn))
