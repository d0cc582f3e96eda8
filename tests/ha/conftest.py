"""The HA suite's own replicated servers: a 3-node RabbitMQ cluster and a pg_auto_failover
formation (tooling/ha.py, tooling/formation.py), on free ports below 32768, data under
`.run/hasuite`, node names of this checkout, started once per session and stopped at its end.
Each test gets a whole fresh system (Stack) on them, and finds every node up and the formation
healthy again whatever the test before it killed."""

import asyncio
import fcntl
import os
import shutil
import signal
import time
import uuid
import zlib
from collections.abc import Iterator

import pytest

from shared.settings import Settings
from tests.ha.checks import RESULTS, report_table
from tooling.formation import Formation, pid_alive
from tooling.ha import RabbitCluster, Servers, free_low_port, start
from tooling.stack import ROOT, Stack

RUN_DIR = ROOT / ".run" / "hasuite"
# One set of node names per checkout: several checkouts (worktrees) may run this suite at once.
TAG = f"{zlib.crc32(str(ROOT).encode()):08x}"


def _exclusive(timeout: float = 900) -> "object":
    """One HA session per checkout at a time: they share `.run/hasuite` and the node names."""
    lock = open(RUN_DIR / "session.lock", "w")  # noqa: SIM115 - the lock lives as long as the open file
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"another HA session holds {lock.name}") from None
            time.sleep(0.5)


def _servers(ports: list[int]) -> Servers:
    amqp, dist, pg = ports[0:3], ports[3:6], ports[6:9]
    return Servers(Formation(RUN_DIR, pg[0], (pg[1], pg[2])),
                   RabbitCluster(RUN_DIR, tuple(amqp), tuple(dist), prefix=f"ha{TAG}-"))


def _stop_leftovers() -> None:
    """What an interrupted session left running (found by pid files), then its data."""
    leftover = _servers([0] * 9)
    for node in leftover.cluster.nodes:
        pid = node.pid()
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    leftover.formation.stop()
    shutil.rmtree(RUN_DIR / "ha", ignore_errors=True)


@pytest.fixture(scope="session")
def ha_servers() -> Iterator[tuple[Servers, Settings]]:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    lock = _exclusive()  # held (open) until the session ends
    _stop_leftovers()
    ports: list[int] = []
    for _ in range(9):
        ports.append(free_low_port(set(ports) | {p + d for p in ports for d in range(100, 121)}))
    servers = _servers(ports)
    formation = servers.formation
    settings = Settings(
        run_dir=RUN_DIR,
        orders_database_url=formation.dsn("orders", "orders", "orders"),
        stock_database_url=formation.dsn("stock", "stock", "stock"),
        amqp_url=servers.cluster.urls("guest", "guest"),
    )
    try:
        start(servers)
        yield servers, settings
    finally:
        servers.cluster.stop()
        formation.stop()
        lock.close()  # type: ignore[attr-defined]


def _all_up(servers: Servers) -> None:
    """Every RabbitMQ node running and the formation primary + synchronous standby."""
    servers.cluster.ensure_running()
    for member in (servers.formation.monitor, *servers.formation.nodes):
        servers.formation.start_member(member)
    asyncio.run(servers.formation.wait_healthy())


@pytest.fixture
def ha_stack(ha_servers: tuple[Servers, Settings]) -> Iterator[tuple[Stack, Servers]]:
    """A whole system of its own for one test: gateway, orders, stock API, 2 stock workers."""
    servers, settings = ha_servers
    _all_up(servers)
    stack = Stack(f"h{uuid.uuid4().hex[:8]}", workers=2, settings=settings,
                  pg=servers.formation, rabbit=servers.cluster)
    try:
        stack.start()
        yield stack, servers
    finally:
        _all_up(servers)
        stack.stop()


@pytest.fixture(scope="module", autouse=True)
def ha_report() -> Iterator[None]:
    """At the end of the module: the table, in .run/hasuite/report.md (and in the terminal)."""
    yield
    if RESULTS:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        (RUN_DIR / "report.md").write_text("# HA fault suite\n\n" + report_table() + "\n")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RESULTS:
        terminalreporter.write_sep("=", "HA fault suite")
        for line in report_table().splitlines():
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"(also in {RUN_DIR / 'report.md'})")
