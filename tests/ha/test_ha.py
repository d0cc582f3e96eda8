"""High availability on real engines (API.md §1 `HA=1`, §7): a node of the RabbitMQ cluster or the
PostgreSQL primary is lost under a steady stream of orders, and afterwards every order that got
202 is final, no message was applied twice, the invariants hold (ledger replay), and every POST
refused meanwhile got 503 problem+json with Retry-After, never a 500 or a wrong answer.

The suite runs its own cluster and formation (conftest.py). Each case records how long orders
went undecided and how many POSTs were refused, in the report table."""

import asyncio
import importlib.util
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from shared.messaging import STOCK_ORDERS
from tests.faults.tools import Load, ready_through_gateway, seed_stock, vhost_of
from tests.ha.checks import Refusals, finish, keep_going, record, say
from tooling.formation import Member
from tooling.ha import Servers
from tooling.stack import Stack

pytestmark = pytest.mark.ha

FREEZE_SECONDS = 30

# Losing a broker needs clients that take the list of brokers in AMQP_URL and move to a live one
# (helper relay's shared/broker.py). Without it every client keeps knocking on the dead node and
# no order is decided: measured here, a case then fails after minutes of timeouts, so it is not
# run until that connect is on main (xfail, not skip: the report shows why).
MULTI_BROKER = importlib.util.find_spec("shared.broker") is not None
needs_multi_broker = pytest.mark.xfail(
    not MULTI_BROKER, run=False,
    reason="clients need the broker list of AMQP_URL (relay's shared/broker.py, not on main yet)")


async def _run_case(stack: Stack, fault: str, seed: int, inject: Callable[[], Awaitable[str]]) -> None:
    """Load, `inject()` (async, returns notes), load again, then every check."""
    result = record(fault)
    refusals = Refusals()
    async with stack.client(event_hooks={"response": [refusals]}) as client:
        store = await seed_stock(stack, client)
        load = Load(client, store, seed=seed, customer=f"c-ha-{seed}").start()
        try:
            await load.wait_accepted(60)
            fault_at = time.time()
            result.notes = await inject()
            await ready_through_gateway(stack, client, timeout=120)
            await keep_going(load, 60, timeout=120)
        finally:
            await load.stop()
        await finish(stack, client, load, result, refusals, fault_at)


# ----- RabbitMQ ----------------------------------------------------------------------------------
@needs_multi_broker
async def test_kill_the_rabbitmq_node_leading_stock_orders(ha_stack: tuple[Stack, Servers]) -> None:
    stack, servers = ha_stack
    cluster = servers.cluster

    async def inject() -> str:
        leader = await asyncio.to_thread(cluster.leader, STOCK_ORDERS, vhost_of(stack))
        pid = leader.pid()
        assert pid is not None
        say(f"kill -9 of {leader.node} (pid {pid}), leader of {STOCK_ORDERS}")
        os.kill(pid, signal.SIGKILL)

        async def new_leader() -> None:
            now = await asyncio.to_thread(cluster.leader, STOCK_ORDERS, vhost_of(stack))
            assert now is not leader, "no new leader yet"

        await _eventually(new_leader, 60)
        return f"{leader.node.split('@')[0]} killed; {STOCK_ORDERS} led by another node"

    await _run_case(stack, "kill -9 of the RabbitMQ node leading stock.orders", 11, inject)


async def test_freeze_a_rabbitmq_node_for_30_s(ha_stack: tuple[Stack, Servers]) -> None:
    """The first node of every client's AMQP_URL (where they all connect first), frozen."""
    stack, servers = ha_stack
    node = servers.cluster.nodes[0]

    async def inject() -> str:
        pid = node.pid()
        assert pid is not None
        say(f"SIGSTOP of {node.node} (pid {pid}) for {FREEZE_SECONDS} s")
        os.kill(pid, signal.SIGSTOP)
        try:
            # The fault's length, not a wait for a result.
            await asyncio.sleep(FREEZE_SECONDS)
        finally:
            os.kill(pid, signal.SIGCONT)
        return f"{node.node.split('@')[0]} (first URL) frozen {FREEZE_SECONDS} s, then SIGCONT"

    await _run_case(stack, f"SIGSTOP of a RabbitMQ node for {FREEZE_SECONDS} s", 12, inject)


# ----- PostgreSQL --------------------------------------------------------------------------------
async def test_kill_the_postgresql_primary(ha_stack: tuple[Stack, Servers]) -> None:
    """The whole primary node (pg_autoctl keeper and postmaster): the standby takes over."""
    stack, servers = ha_stack
    formation = servers.formation

    async def inject() -> str:
        primary = await formation.primary()
        assert primary is not None
        say(f"kill -9 of PostgreSQL primary {primary.name} (keeper + postmaster)")
        began = time.monotonic()
        formation.kill_member(primary)

        async def promoted() -> Member:
            now = await formation.primary()
            assert now is not None and now is not primary, "no new primary yet"
            return now

        new = await _eventually(promoted, 120)
        return f"{primary.name} killed; {new.name} primary {time.monotonic() - began:.1f} s later"

    await _run_case(stack, "kill -9 of the PostgreSQL primary (keeper + postmaster)", 13, inject)


async def test_kill_only_the_postmaster_of_the_primary(ha_stack: tuple[Stack, Servers]) -> None:
    """Its keeper starts it again in place: a restart, not a failover."""
    stack, servers = ha_stack
    formation = servers.formation

    async def inject() -> str:
        primary = await formation.primary()
        assert primary is not None
        postmaster = primary.postmaster_pid()
        assert postmaster is not None
        say(f"kill -9 of the postmaster of {primary.name} (pid {postmaster})")
        os.kill(postmaster, signal.SIGKILL)

        async def back() -> None:
            now = primary.postmaster_pid()
            assert now is not None and now != postmaster, "postmaster not restarted yet"
            assert await formation.primary() is primary

        await _eventually(back, 120)
        return f"postmaster of {primary.name} killed; its keeper restarted it, still primary"

    await _run_case(stack, "kill -9 of the primary's postmaster only (restart)", 14, inject)


async def _eventually(check: Callable[[], Awaitable[Any]], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except (AssertionError, OSError, RuntimeError, subprocess.CalledProcessError) as exc:
            # (a rabbitmqctl aimed at a node as it dies fails: ask again)
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s: {exc}") from None
        await asyncio.sleep(0.5)
