"""A whole running system for end-to-end tests: its own databases, RabbitMQ vhost and ports,
real processes (gateway, orders, stock API, N stock workers), started and stopped by the tests."""

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import httpx

from shared.db import migrate
from shared.messaging import EXCHANGE, build_message
from shared.settings import Settings
from tooling import ha
from tooling.access import url_users
from tooling.devenv import Postgres, Rabbit, bindable, ha_enabled, local_servers, up, wait_ready
from tooling.ha import RabbitCluster
from tooling.migrate import MIGRATIONS

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_block(size: int) -> int:
    """The first of `size` consecutive free ports (stock workers listen on base + index)."""
    for _ in range(100):
        # Below the ephemeral range (32768+), where the OS never hands a port out by itself.
        base = random.randrange(20000, 32000)
        if all(bindable(base + i) for i in range(size)):
            return base
    raise RuntimeError(f"no block of {size} free ports found")



def _with_db(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _with_vhost(url: str, vhost: str) -> str:
    """`url` (one broker or several, comma-separated) with `vhost`."""
    return ",".join(urlunsplit(urlsplit(one)._replace(path=f"/{vhost}")) for one in url.split(","))


@dataclass
class Stack:
    name: str
    env_overrides: dict[str, str] = field(default_factory=dict)
    workers: int = 3
    settings: Settings = field(default_factory=Settings)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    admin_token: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Servers to use instead of the ones `settings` points at (the fault suite runs its own,
    # with a node name of its own); None: the local servers of `settings`.
    pg: Postgres | None = None  # with HA=1: a tooling.formation.Formation
    rabbit: "Rabbit | RabbitCluster | None" = None

    def __post_init__(self) -> None:
        if self.pg is None or self.rabbit is None:
            pg, rabbit = _servers(self.settings)
            self.pg = self.pg or pg
            self.rabbit = self.rabbit or rabbit
        assert self.pg is not None and self.rabbit is not None, "tests need the local servers"
        self.orders_dsn = _with_db(self.settings.orders_database_url, f"orders_{self.name}")
        self.stock_dsn = _with_db(self.settings.stock_database_url, f"stock_{self.name}")
        self.amqp_url = _with_vhost(self.settings.amqp_url, f"test-{self.name}")
        self.ports = {"gateway": free_port(), "orders": free_port(), "stock": free_port()}
        # Room for replacement workers (tests start worker N after killing one).
        self.worker_port = free_port_block(self.workers + 8)
        self.log_dir = self.settings.run_dir.resolve() / "test-logs" / self.name
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # ----- lifecycle -------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "GATEWAY_PORT": str(self.ports["gateway"]),
            "ORDERS_PORT": str(self.ports["orders"]),
            "STOCK_PORT": str(self.ports["stock"]),
            "AMQP_URL": self.amqp_url,
            "ORDERS_AMQP_URL": _with_vhost(self.settings.orders_amqp_url, f"test-{self.name}"),
            "STOCK_AMQP_URL": _with_vhost(self.settings.stock_amqp_url, f"test-{self.name}"),
            "ORDERS_DATABASE_URL": self.orders_dsn,
            "STOCK_DATABASE_URL": self.stock_dsn,
            "ADMIN_TOKEN": self.admin_token,
            "STOCK_WORKER_PORT": str(self.worker_port),
            "RUN_DIR": str(self.settings.run_dir.resolve()),
            **self.env_overrides,
        }

    def provision(self) -> None:
        pg, rabbit = self.pg, self.rabbit
        assert pg is not None and rabbit is not None
        rabbit.delete_vhost(f"test-{self.name}")
        rabbit.ensure_vhost(f"test-{self.name}")

        async def databases() -> None:
            await pg.ensure_database(self.orders_dsn, fresh=True)
            await pg.ensure_database(self.stock_dsn, fresh=True)
            await migrate(pg.migrator_dsn(self.orders_dsn), MIGRATIONS["orders"])
            await migrate(pg.migrator_dsn(self.stock_dsn), MIGRATIONS["stock"])

        asyncio.run(databases())

    def start(self) -> "Stack":
        self.provision()
        for name, command in (("orders", "orders-service"), ("stock-api", "stock-api")):
            self.start_process(name, command)
        for i in range(self.workers):
            self.start_worker(i)
        self.start_process("gateway", "gateway")
        urls = [f"http://127.0.0.1:{port}" for port in self.ports.values()]
        urls += [self.worker_url(i) for i in range(self.workers)]
        for url in urls:
            if not wait_ready(f"{url}/health/ready", timeout=60):
                self.stop()  # no test will: its fixture never got the stack
                raise RuntimeError(f"stack {self.name} did not get ready; logs in {self.log_dir}")
        return self

    def start_process(self, name: str, command: str, extra_env: dict[str, str] | None = None) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child process owns it
        self.procs[name] = subprocess.Popen(
            [str(BIN / command)], env={**self.env(), **(extra_env or {})}, cwd=ROOT,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def start_worker(self, index: int) -> None:
        self.start_process(f"worker-{index}", "stock-worker", {"STOCK_WORKER_INDEX": str(index)})

    def worker_url(self, index: int) -> str:
        """Where worker `index` serves /health/… and /metrics."""
        return f"http://127.0.0.1:{self.worker_port + index}"

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()
        self.destroy()

    def destroy(self) -> None:
        """Drops the stack's databases and vhost so repeated local runs leave nothing behind."""
        pg, rabbit = self.pg, self.rabbit
        assert pg is not None and rabbit is not None

        async def drop() -> None:
            conn = await asyncpg.connect(pg.admin_dsn())
            try:
                for dsn in (self.orders_dsn, self.stock_dsn):
                    await conn.execute(f'DROP DATABASE IF EXISTS "{urlsplit(dsn).path.lstrip("/")}" WITH (FORCE)')
            finally:
                await conn.close()

        asyncio.run(drop())
        rabbit.delete_vhost(f"test-{self.name}")

    # ----- clients -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        return httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits, **kwargs)

    async def stock_db(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.stock_dsn)

    async def orders_db(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.orders_dsn)

    async def publish_raw(
        self, body: bytes, event_type: str, message_id: str, routing_key: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        """Publishes a message as a producer would (for redelivery and poison tests)."""
        connection = await aio_pika.connect(self.amqp_url.split(",")[0])
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(EXCHANGE)
            message = build_message(body=body, event_id=message_id, event_type=event_type,
                                    correlation_id=correlation_id, request_id=None)
            await exchange.publish(message, routing_key=routing_key or event_type)


def _servers(settings: Settings) -> "tuple[Postgres | None, Rabbit | RabbitCluster | None]":
    if ha_enabled():
        servers = ha.contract_servers(settings.run_dir)
        servers.cluster.users = url_users(settings)  # the users ha.up provisioned
        return servers.formation, servers.cluster
    return local_servers(settings)


def ensure_infrastructure() -> Settings:
    """`make test` already provisioned; this lets `pytest` alone work too. With HA=1 the
    replicated servers, whose URLs the stacks started next inherit."""
    settings = Settings()
    if ha_enabled():
        ha.up(settings)
        return Settings()
    up(settings)
    return settings


__all__ = ["Postgres", "Rabbit", "Stack", "ensure_infrastructure"]
