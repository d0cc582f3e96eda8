"""The fault suite's own PostgreSQL and RabbitMQ.

The other test modules share the local servers on 5432/5672 (concurrently on a developer's
machine, sequentially in CI); this suite stops and restarts servers, so it starts its own pair on
free ports, with data under `.run/faults` and a RabbitMQ node name of its own, and stops both at
the end of the session. Each test gets a whole fresh system (Stack) on them."""

import asyncio
import fcntl
import os
import shutil
import signal
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import pytest

from shared.settings import Settings
from tests.faults.tools import RESULTS, report_table
from tooling.devenv import Postgres, Rabbit, bindable
from tooling.stack import ROOT, Stack, free_port

RUN_DIR = ROOT / ".run" / "faults"
# One node name per checkout: several checkouts (worktrees) may run this suite at once.
NODE = f"faults-{zlib.crc32(str(ROOT).encode()):08x}@localhost"
STACK_PREFIX = "f"


class FaultRabbit(Rabbit):
    """The suite's broker: its whole state is thrown away at the next session's start, so the
    per-stack vhosts (fresh random names) need no deleting one by one, which saves two slow
    `rabbitmqctl` calls per test."""

    def delete_vhost(self, vhost: str) -> None:
        pass


@dataclass
class FaultServers:
    settings: Settings
    pg: Postgres
    rabbit: Rabbit




def _rabbit_port() -> int:
    for _ in range(100):
        port = free_port()
        if bindable(Rabbit(RUN_DIR, port).dist_port):
            return port
    raise RuntimeError("no free AMQP port whose distribution port is free too")


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop_leftovers() -> None:
    """A previous session that was interrupted may have left this suite's servers running."""
    postmaster = RUN_DIR / "pg" / "data" / "postmaster.pid"
    if postmaster.exists():
        Postgres(RUN_DIR, 0).stop()
    pid_file = RUN_DIR / "rabbitmq" / "rabbitmq.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().strip() or 0)
        if pid and _pid_alive(pid):
            Rabbit(RUN_DIR, 0, node=NODE).stop()
            deadline = time.monotonic() + 30
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)
    # A fresh node every session: no queues of stacks an interrupted session left behind.
    shutil.rmtree(RUN_DIR / "rabbitmq" / "mnesia", ignore_errors=True)


async def _drop_leftover_databases(pg: Postgres) -> None:
    conn = await asyncpg.connect(pg.admin_dsn())
    try:
        names = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'orders\\_%' OR datname LIKE 'stock\\_%'")
        for row in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
    finally:
        await conn.close()


def _exclusive(timeout: float = 600) -> "object":
    """One fault session per checkout at a time: they share `.run/faults` and the node name."""
    lock = open(RUN_DIR / "session.lock", "w")  # noqa: SIM115 - the lock lives as long as the open file
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"another fault session holds {lock.name}") from None
            time.sleep(0.5)


@pytest.fixture(scope="session")
def fault_servers() -> Iterator[FaultServers]:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    lock = _exclusive()  # held (open) until the session ends
    _stop_leftovers()  # with the lock held, anything still running is a dead session's
    pg_port, amqp_port = free_port(), _rabbit_port()
    settings = Settings(
        run_dir=RUN_DIR,
        orders_database_url=f"postgresql://orders:orders@127.0.0.1:{pg_port}/orders",
        stock_database_url=f"postgresql://stock:stock@127.0.0.1:{pg_port}/stock",
        amqp_url=f"amqp://guest:guest@127.0.0.1:{amqp_port}/",
    )
    pg = Postgres(RUN_DIR, pg_port)
    rabbit = FaultRabbit(RUN_DIR, amqp_port, node=NODE)
    try:
        pg.ensure_running()
        rabbit.ensure_running()
        asyncio.run(_drop_leftover_databases(pg))
        yield FaultServers(settings, pg, rabbit)
    finally:
        rabbit.stop()
        pg.stop()
        lock.close()  # type: ignore[attr-defined]


@pytest.fixture
def fault_stack(fault_servers: FaultServers) -> Iterator[Stack]:
    """A whole system of its own for one test: gateway, orders, stock API, 2 stock workers."""
    servers = fault_servers
    # A test that failed in the middle of its fault may have left a server down.
    servers.pg.ensure_running()
    servers.rabbit.ensure_running()
    stack = Stack(f"{STACK_PREFIX}{uuid.uuid4().hex[:8]}", workers=2, settings=servers.settings,
                  pg=servers.pg, rabbit=servers.rabbit)
    try:
        stack.start()
        yield stack
    finally:
        servers.pg.ensure_running()
        servers.rabbit.ensure_running()
        stack.stop()


@pytest.fixture(scope="module", autouse=True)
def fault_report() -> Iterator[None]:
    """At the end of the module: the table, in .run/faults/report.md (and in the terminal summary)."""
    yield
    if RESULTS:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        (RUN_DIR / "report.md").write_text("# Fault suite\n\n" + report_table() + "\n")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RESULTS:
        terminalreporter.write_sep("=", "fault suite")
        for line in report_table().splitlines():
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"(also in {RUN_DIR / 'report.md'})")
