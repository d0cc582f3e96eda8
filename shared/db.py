"""asyncpg pools with JSON codecs, the migration runner and the inbox check shared by services."""

import asyncio
import logging
from contextvars import ContextVar
from importlib.resources.abc import Traversable
from typing import Any

import asyncpg
import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

log = logging.getLogger(__name__)

MIGRATIONS_LOCK = 7_000_001  # advisory lock key: one migrator at a time per database

# The database cannot take this work right now, whatever the work: it is down, restarting, or
# failing over (with a libpq multi-host URL, `target_session_attrs=read-write` finds no node
# taking writes until the standby is promoted, and a session that lands on a node being
# demoted is refused writes). Retrying later is the answer, never a verdict on the request or
# the message. (TimeoutError is an OSError too.)
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,
)


# Set for the time of an HTTP request (shared/edge.py): how long it may wait for a connection.
# Unset (consumers, relays, sweeps): they wait as long as it takes, as before.
acquire_timeout: ContextVar[float | None] = ContextVar("acquire_timeout", default=None)


class PoolBusy(Exception):
    """No database connection came free in time: answered 503, the client retries."""


class Pool(asyncpg.Pool):
    """asyncpg's pool; while `acquire_timeout` is set, waiting for a connection is bounded."""

    __slots__ = ()

    async def _acquire(self, timeout: float | None) -> Any:
        limit = acquire_timeout.get()
        if timeout is not None or limit is None:
            return await super()._acquire(timeout)
        try:
            return await super()._acquire(limit)
        except TimeoutError:
            raise PoolBusy(f"no database connection came free within {limit:g} s") from None


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename,
            encoder=lambda value: orjson.dumps(value).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


async def _no_reset(conn: asyncpg.Connection) -> None:
    return None


async def create_pool(dsn: str, size: int = 10) -> asyncpg.Pool:
    """A pool, once the database answers (a service may start before it, e.g. under compose).

    With a multi-host `dsn` (`postgresql://u:p@h1:5432,h2:5433/db?target_session_attrs=read-write`)
    every new connection goes to the node taking writes. A failover breaks the pooled
    connections to the old primary; the pool drops each broken one and the next acquire
    connects anew, to the promoted standby once there is one (no restart, no pool swap)."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type((asyncpg.PostgresError, *UNAVAILABLE)),
        wait=wait_exponential(multiplier=0.2, max=3), stop=stop_after_delay(120), reraise=True,
        before_sleep=lambda s: log.warning("database not reachable yet; retrying"),
    ):
        with attempt:
            return await Pool(  # asyncpg.create_pool's own defaults, with our pool class
                dsn, min_size=1, max_size=size, max_queries=50000,
                max_inactive_connection_lifetime=300.0, loop=None,
                connection_class=asyncpg.Connection, record_class=asyncpg.Record,
                init=_init_connection, command_timeout=30,
                # No RESET ALL / UNLISTEN round trip at every release: nothing here changes
                # session state on a pooled connection (all advisory locks are transaction-level).
                reset=_no_reset,
                # A process that hangs mid-transaction (stopped, swapping) must not keep its
                # row locks for ever: the server ends such a session and everyone moves on.
                server_settings={"idle_in_transaction_session_timeout": "30s"},
            )
    raise AssertionError("unreachable")


async def first_delivery(conn: asyncpg.Connection, message_id: str) -> bool:
    """Records the message in the inbox inside the caller's transaction.

    False means it was handled before: the caller must change nothing. Because the row commits
    (or rolls back) together with the effect, a redelivery after a crash either finds both or
    neither."""
    status = await conn.execute(
        "INSERT INTO inbox (message_id) VALUES ($1) ON CONFLICT DO NOTHING", message_id
    )
    return status.endswith(" 1")


# Inbox retention (API.md §6, shared/retention.py): at most $1 entries older than 7 days, oldest
# first, over the index on handled_at; counts them.
PURGE_INBOX = """
WITH gone AS (
    DELETE FROM inbox WHERE message_id IN (
        SELECT message_id FROM inbox WHERE handled_at < now() - interval '7 days'
        ORDER BY handled_at LIMIT $1 FOR UPDATE SKIP LOCKED)
    RETURNING 1)
SELECT count(*) FROM gone
"""


async def migrate(dsn: str, migrations: Traversable) -> list[str]:
    """Applies the `*.sql` files of `migrations` (a service's MIGRATIONS) in name order, each once,
    each in its own transaction."""
    files = sorted((f for f in migrations.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    conn = await asyncpg.connect(dsn)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATIONS_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        for file in files:
            if file.name in done:
                continue
            async with conn.transaction():
                await conn.execute(file.read_text())
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", file.name)
            applied.append(file.name)
            log.info("migration applied", extra={"migration": file.name})
    finally:
        await conn.close()
    return applied


async def wait_for_database(dsn: str, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=2)
            await conn.close()
            return
        except (asyncpg.PostgresError, *UNAVAILABLE):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)
