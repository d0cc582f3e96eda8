"""Least privilege on the local servers (issue 10 item 4).

PostgreSQL, per service database: a migrator role (`<role>_migrator`, password generated into
RUN_DIR/secrets) owns the database, its schema and every table, and runs the migrations; the
runtime role named in the service's URL gets CONNECT, TEMPORARY (the stock import's temporary
table), USAGE on the schema and SELECT/INSERT/UPDATE/DELETE on the tables and sequences the
migrator creates, now and later (ALTER DEFAULT PRIVILEGES): no DDL. The ledger is made
append-only for it by a migration (stock 022).

RabbitMQ: one user per service whose events it may publish are fixed by topic permissions on
`inventory.events` (and no right to the default exchange, so no way around them), an
administrator for tools and tests, and no `guest`. Users named in AMQP_URL (every helper's
`guest:guest`, say) are provisioned exactly as named, with full rights in their vhosts, so
explicit setups keep working."""

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shared.messaging import EXCHANGE
from shared.settings import Settings, secret

if TYPE_CHECKING:
    from tooling.devenv import Rabbit
    from tooling.ha import RabbitCluster

# The events each service may publish (API.md §6).
EVENTS = {"orders": ("PedidoCriado", "PedidoConfirmado", "PedidoCancelado"),
          "stock": ("AtualizarStatus", "EstoqueAlterado")}
# What a service may declare, bind, publish to and read: the project's exchanges and queues and
# private queues (server-named `amq.gen-…`, aio_pika's `amq_<hex>`: the live feed's); not
# `amq.default`, through which a queue could be fed directly.
RESOURCES = r"^(inventory\..*|stock\.orders.*|orders\.status.*|amq\.gen-.*|amq_[0-9a-f]+)$"

LEDGER = "movement"  # append-only for the runtime role (stock migration 022)

Users = dict[str, tuple[str, str | None]]  # user -> (password, its service; None: full rights)


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# ----- PostgreSQL -----------------------------------------------------------------------------

def migrator_of(role: str) -> str:
    return f"{role}_migrator"


def migrator_dsn(dsn: str, run_dir: Path) -> str:
    """`dsn` as its database's migrator (owner of the schema: runs migrations, tests tamper)."""
    parts = urlsplit(dsn)
    role = migrator_of(parts.username or "")
    password = secret(run_dir, f"{role}-db-password")
    netloc = f"{role}:{password}@{parts.netloc.rsplit('@', 1)[-1]}"
    return urlunsplit(parts._replace(netloc=netloc))


async def _ensure_role(conn: asyncpg.Connection, role: str, password: str) -> None:
    verb = "ALTER" if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role) else "CREATE"
    try:
        await conn.execute(f'{verb} ROLE "{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE '
                           f"PASSWORD {_literal(password)}")
    except (asyncpg.DuplicateObjectError, asyncpg.InternalServerError):
        pass  # another provisioning (a concurrent test stack) made or changed it just now


async def provision_database(admin_dsn: str, dsn: str, run_dir: Path, *, fresh: bool = False) -> None:
    """The roles and the database of `dsn`, owned by its migrator; the runtime role of `dsn`
    reaches only that database, without DDL. An existing database owned by the runtime role
    (made before this) is handed to the migrator."""
    parts = urlsplit(dsn)
    role, database = parts.username or "", parts.path.lstrip("/")
    migrator = migrator_of(role)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await _ensure_role(conn, role, parts.password or "")
        await _ensure_role(conn, migrator, secret(run_dir, f"{migrator}-db-password"))
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if exists and fresh:
            await conn.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
            exists = False
        verb = f'ALTER DATABASE "{database}" OWNER TO' if exists else f'CREATE DATABASE "{database}" OWNER'
        await conn.execute(f'{verb} "{migrator}"')
        await conn.execute(f'REVOKE ALL ON DATABASE "{database}" FROM PUBLIC')
        await conn.execute(f'GRANT CONNECT, TEMPORARY ON DATABASE "{database}" TO "{role}"')
    finally:
        await conn.close()
    conn = await asyncpg.connect(urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{database}")))
    try:
        await _runtime_grants(conn, role, migrator)
    finally:
        await conn.close()


async def _runtime_grants(conn: asyncpg.Connection, role: str, migrator: str) -> None:
    owned = await conn.fetchval("""
        SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relowner = (SELECT oid FROM pg_roles WHERE rolname = $1)""",
                                role)
    if owned:
        await conn.execute(f'REASSIGN OWNED BY "{role}" TO "{migrator}"')
    tables = "SELECT, INSERT, UPDATE, DELETE"
    await conn.execute(f"""
        ALTER SCHEMA public OWNER TO "{migrator}";
        REVOKE CREATE ON SCHEMA public FROM PUBLIC;
        GRANT USAGE ON SCHEMA public TO "{role}";
        ALTER DEFAULT PRIVILEGES FOR ROLE "{migrator}" IN SCHEMA public GRANT {tables} ON TABLES TO "{role}";
        ALTER DEFAULT PRIVILEGES FOR ROLE "{migrator}" IN SCHEMA public
            GRANT USAGE, SELECT ON SEQUENCES TO "{role}";
    """)
    if owned:  # tables made before the migrator existed; the ledger stays append-only
        await conn.execute(f'GRANT {tables} ON ALL TABLES IN SCHEMA public TO "{role}";'
                           f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", LEDGER):
            await conn.execute(f'REVOKE UPDATE, DELETE, TRUNCATE ON {LEDGER} FROM "{role}"')


# ----- RabbitMQ -------------------------------------------------------------------------------

def url_users(settings: Settings) -> Users:
    """The users the services and tools connect as (local brokers only): a user shared by both
    services, or the AMQP_URL one, gets full rights; a service's own user only its own."""
    users: Users = {}
    for url, service in ((settings.amqp_url, None), (settings.orders_amqp_url, "orders"),
                         (settings.stock_amqp_url, "stock")):
        for one in url.split(","):
            parts = urlsplit(one.strip())
            if parts.hostname not in ("127.0.0.1", "localhost", "::1") or not parts.username:
                continue
            known = users.get(parts.username)
            if known is None:
                users[parts.username] = (parts.password or "", service)
            elif known[1] != service:
                users[parts.username] = (known[0], None)
    return users


def broker_users(settings: Settings) -> Users:
    """`url_users` and, always, each service's restricted user (password in RUN_DIR/secrets)
    unless a URL already uses its name."""
    users = url_users(settings)
    for service in EVENTS:
        users.setdefault(service, (secret(settings.run_dir, f"{service}-amqp-password"), service))
    return users


def service_url(settings: Settings, service: str, vhost: str = "") -> str:
    """The URL of `service`'s restricted user on the local broker (for tests)."""
    password, only = broker_users(settings)[service]
    assert only == service, f"user {service} is taken by a URL with other rights"
    parts = urlsplit(settings.amqp_url.split(",")[0])
    return urlunsplit(parts._replace(netloc=f"{service}:{password}@{parts.hostname}:{parts.port}",
                                     path=f"/{vhost}"))


def grant_vhost(rabbit: "Rabbit | RabbitCluster", vhost: str, users: Users) -> None:
    for user, (_, service) in users.items():
        if service is None:
            rabbit.ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
            continue
        rabbit.ctl("set_permissions", "-p", vhost, user, RESOURCES, RESOURCES, RESOURCES)
        rabbit.ctl("set_topic_permissions", "-p", vhost, user, EXCHANGE,
                   f"^({'|'.join(EVENTS[service])})$", ".*")


def provision_broker(rabbit: "Rabbit | RabbitCluster", settings: Settings) -> None:
    """Users, passwords and rights on the default vhost; `guest` goes unless a URL names it.
    Skipped when nothing changed since the last time (each rabbitmqctl call costs a second)."""
    users = broker_users(settings)
    digest = hashlib.sha256(repr(sorted(users.items())).encode()).hexdigest()
    marker = rabbit.home / "inventory-users.sha256"
    listed = rabbit.ctl("list_users", "--quiet", "--no-table-headers").stdout.splitlines()
    existing = {line.split()[0] for line in listed if line.strip()}
    if marker.exists() and marker.read_text() == digest and set(users) <= existing:
        return  # a broker whose data was wiped lacks the users: provisioned again
    for user, (password, service) in users.items():
        if user in existing:
            rabbit.ctl("change_password", user, password)
        else:
            rabbit.ctl("add_user", user, password)
        rabbit.ctl("set_user_tags", user, *(["administrator"] if service is None else []))
    grant_vhost(rabbit, "/", users)
    if "guest" in existing and "guest" not in users:
        rabbit.ctl("delete_user", "guest")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(digest)


__all__ = ["broker_users", "grant_vhost", "migrator_dsn", "provision_broker",
           "provision_database", "service_url", "url_users"]
