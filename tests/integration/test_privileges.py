"""Least privilege on the local servers (tooling/access.py): the runtime database roles run no
DDL and cannot rewrite the ledger; each RabbitMQ service user may publish only its own events,
and the broker itself refuses the others."""

import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
import asyncpg
import pytest

from shared.broker import declare_topology
from shared.db import migrate
from shared.messaging import EXCHANGE
from shared.settings import Settings
from tooling.access import EVENTS, broker_users, grant_vhost, service_url
from tooling.devenv import Postgres, local_servers
from tooling.migrate import MIGRATIONS

pytestmark = pytest.mark.usefixtures("infrastructure")


def local_pg(settings: Settings) -> Postgres:
    pg, _ = local_servers(settings)
    assert pg is not None, "tests need the local PostgreSQL"
    return pg


@pytest.fixture
async def stock_database() -> AsyncIterator[tuple[str, str]]:
    """A fresh stock database, migrated by its migrator: (runtime dsn, migrator dsn)."""
    settings = Settings()
    pg = local_pg(settings)
    dsn = urlunsplit(urlsplit(settings.stock_database_url)._replace(path=f"/stock_pv{uuid.uuid4().hex[:8]}"))
    await pg.ensure_database(dsn, fresh=True)
    await migrate(pg.migrator_dsn(dsn), MIGRATIONS["stock"])
    yield dsn, pg.migrator_dsn(dsn)
    admin = await asyncpg.connect(pg.admin_dsn())
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{urlsplit(dsn).path[1:]}" WITH (FORCE)')
    finally:
        await admin.close()


REFUSED = (asyncpg.InsufficientPrivilegeError,)
DDL = [
    "CREATE TABLE intruder (id int)",
    "ALTER TABLE stock_item ADD COLUMN intruder int",
    "ALTER TABLE movement DISABLE TRIGGER ALL",
    "DROP TABLE inbox",
    "CREATE INDEX intruder ON stock_item (on_hand)",
    "TRUNCATE movement",
]
LEDGER_REWRITES = [
    "UPDATE movement SET on_hand_delta = 0",
    "DELETE FROM movement",
]


async def refused(conn: asyncpg.Connection, statement: str) -> bool:
    try:
        async with conn.transaction():
            await conn.execute(statement)
    except REFUSED:
        return True
    return False


async def test_the_runtime_role_runs_no_ddl_and_cannot_rewrite_the_ledger(stock_database: tuple[str, str]) -> None:
    runtime_dsn, migrator_dsn = stock_database
    runtime = await asyncpg.connect(runtime_dsn)
    migrator = await asyncpg.connect(migrator_dsn)
    try:
        for statement in DDL + LEDGER_REWRITES:
            assert await refused(runtime, statement), statement
        # What the service does is still allowed: append to the ledger, change the rest.
        async with runtime.transaction():
            await runtime.execute("""INSERT INTO stock_item (store_id, sku, on_hand, reserved, version, updated_at)
                                     VALUES ('S', 'A', 5, 0, 1, now())""")
            await runtime.execute("""INSERT INTO movement (store_id, sku, version, kind, on_hand_delta,
                                     reserved_delta, on_hand, reserved, at, event_id)
                                     VALUES ('S', 'A', 1, 'created', 5, 0, 5, 0, now(), gen_random_uuid())""")
            await runtime.execute("UPDATE stock_item SET on_hand = 6 WHERE sku = 'A'")
            await runtime.execute("DELETE FROM inbox")
            await runtime.execute("CREATE TEMP TABLE import_row (line int) ON COMMIT DROP")
        assert await runtime.fetchval("SELECT count(*) FROM movement") == 1

        # A table a later migration adds is the runtime's to use (default privileges), and a
        # renamed ledger stays append-only.
        await migrator.execute("CREATE TABLE later (id int PRIMARY KEY); ALTER TABLE movement RENAME TO ledger")
        await runtime.execute("INSERT INTO later VALUES (1); UPDATE later SET id = 2; DELETE FROM later")
        assert await refused(runtime, "UPDATE ledger SET on_hand_delta = 0")
        assert await refused(runtime, "DELETE FROM ledger")
        assert await refused(runtime, "DROP TABLE later")
    finally:
        await runtime.close()
        await migrator.close()


async def test_a_database_the_runtime_role_owned_is_handed_to_the_migrator() -> None:
    """A database made before the migrator existed (owned by the runtime role) is converted."""
    settings = Settings()
    pg = local_pg(settings)
    dsn = urlunsplit(urlsplit(settings.stock_database_url)._replace(path=f"/stock_old{uuid.uuid4().hex[:8]}"))
    role = urlsplit(dsn).username
    admin = await asyncpg.connect(pg.admin_dsn())
    try:
        await pg.ensure_database(dsn, fresh=True)
        await admin.execute(f'ALTER DATABASE "{urlsplit(dsn).path[1:]}" OWNER TO "{role}"')
        old = await asyncpg.connect(urlunsplit(urlsplit(pg.admin_dsn())._replace(path=urlsplit(dsn).path)))
        try:  # the old way: the runtime role owns everything it made
            await old.execute(f'ALTER SCHEMA public OWNER TO "{role}"; SET ROLE "{role}";'
                              "CREATE TABLE movement (id int); CREATE TABLE inbox (message_id text)")
        finally:
            await old.close()
        await pg.ensure_database(dsn)
        runtime = await asyncpg.connect(dsn)
        try:
            await runtime.execute("INSERT INTO inbox VALUES ('m'); DELETE FROM inbox; INSERT INTO movement VALUES (1)")
            for statement in ("DROP TABLE inbox", "DELETE FROM movement", "CREATE TABLE x (id int)"):
                assert await refused(runtime, statement), statement
        finally:
            await runtime.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{urlsplit(dsn).path[1:]}" WITH (FORCE)')
        await admin.close()


# ----- RabbitMQ -------------------------------------------------------------------------------

@pytest.fixture
async def vhost() -> AsyncIterator[str]:
    """A vhost with the topology declared and each service's own user granted on it."""
    settings = Settings()
    _, rabbit = local_servers(settings)
    assert rabbit is not None, "tests need the local RabbitMQ"
    name = f"test-acl-{uuid.uuid4().hex[:8]}"
    rabbit.ctl("add_vhost", name)
    users = broker_users(settings)
    grant_vhost(rabbit, name, {service: users[service] for service in EVENTS} | rabbit.users)
    admin = await aio_pika.connect(urlunsplit(urlsplit(settings.amqp_url)._replace(path=f"/{name}")))
    async with admin:
        await declare_topology(admin, await admin.channel(), settings.delivery_limit)
    try:
        yield name
    finally:
        rabbit.delete_vhost(name)


async def publish(url: str, routing_key: str, exchange: str = EXCHANGE) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = channel.default_exchange if exchange == "" else await channel.get_exchange(exchange, ensure=False)
        await target.publish(aio_pika.Message(b"{}", message_id=str(uuid.uuid4())), routing_key=routing_key)


@pytest.mark.parametrize(("service", "other"), [("orders", "stock"), ("stock", "orders")])
async def test_each_broker_user_publishes_only_its_own_events(vhost: str, service: str, other: str) -> None:
    url = service_url(Settings(), service, vhost)
    for event in EVENTS[service]:
        await publish(url, event)  # confirmed by the broker
    for event in EVENTS[other]:
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await publish(url, event)
    # Nor straight into a queue through the default exchange, around the topic permissions.
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        await publish(url, "orders.status" if service == "orders" else "stock.orders", exchange="")


def test_no_guest_user_unless_a_url_names_it() -> None:
    settings = Settings()
    _, rabbit = local_servers(settings)
    assert rabbit is not None
    listed = {line.split()[0] for line in rabbit.ctl("list_users", "--quiet", "--no-table-headers")
              .stdout.splitlines() if line.strip()}
    assert set(broker_users(settings)) <= listed
    assert ("guest" in listed) == ("guest" in rabbit.users), (listed, rabbit.users)
