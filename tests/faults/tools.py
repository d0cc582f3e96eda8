"""What the fault tests share: a steady order load through the gateway, the broker and process
probes used to aim a fault, and the after-the-fact checks of every effect (API.md §3, §6)."""

import asyncio
import json
import os
import random
import socket
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.helpers import create_order, eventually, put_stock, random_store
from tooling.devenv import Rabbit
from tooling.invariants import check_stock_invariants
from tooling.stack import Stack

FINAL = {"reserved", "rejected"}
SKUS = [f"SKU-{i:03d}" for i in range(20)]
ON_HAND = 40  # per sku: the load asks for more than that, so orders are both reserved and rejected
DRAIN_TIMEOUT = 90.0


def say(message: str) -> None:
    """A timestamped line in the test's captured output (shown when it fails, or with -s)."""
    print(f"[faults {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----- the report ------------------------------------------------------------------------------
@dataclass
class FaultResult:
    fault: str
    accepted: int = 0
    final: int = 0
    refused: int = 0  # POSTs answered with anything but 202 (or not answered)
    violations: list[str] = field(default_factory=list)
    notes: str = ""


RESULTS: list[FaultResult] = []


def report_table() -> str:
    lines = [
        "| fault | orders accepted | orders final | POSTs not 202 | invariant violations | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in RESULTS:
        lines.append(f"| {r.fault} | {r.accepted} | {r.final} | {r.refused} | {len(r.violations)} | {r.notes} |")
    return "\n".join(lines)


def record(fault: str) -> FaultResult:
    """A row of the report, listed at once so that a failing test still shows up."""
    result = FaultResult(fault)
    RESULTS.append(result)
    return result


# ----- the load ----------------------------------------------------------------------------------
@dataclass
class Outcome:
    sent: float
    done: float
    status: int | str


class Load:
    """Submits single- and multi-line orders at `rate` per second until stopped, and remembers
    every order that got 202 (only those count) and the outcome of every POST."""

    def __init__(self, client: httpx.AsyncClient, store: str, *, rate: float = 50, seed: int = 0,
                 customer: str = "c-load", concurrency: int = 40) -> None:
        self.client = client
        self.store = store
        self.rate = rate
        self.customer = customer
        self.random = random.Random(seed)
        self.accepted: dict[str, list[tuple[str, int]]] = {}
        self.outcomes: list[Outcome] = []
        self.anomalies: list[str] = []  # answers that break the contract, whatever the fault
        self._slots = asyncio.Semaphore(concurrency)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()

    def start(self) -> "Load":
        self._task = asyncio.create_task(self._run(), name="order-load")
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task
        await asyncio.gather(*self._in_flight, return_exceptions=True)

    def items(self) -> list[tuple[str, int]]:
        lines = 1 if self.random.random() < 0.5 else self.random.randint(2, 4)
        return [(sku, self.random.randint(1, 3)) for sku in self.random.sample(SKUS, lines)]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = 1 / self.rate
        next_at = loop.time()
        while not self._stopping.is_set():
            await self._slots.acquire()
            task = asyncio.create_task(self._one(self.items()))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
            next_at = max(next_at + interval, loop.time())  # behind schedule: no burst to catch up
            try:  # pacing the load, not waiting for a result
                await asyncio.wait_for(self._stopping.wait(), timeout=next_at - loop.time())
            except TimeoutError:
                pass

    async def _one(self, items: list[tuple[str, int]]) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        status: int | str
        try:
            response = await create_order(self.client, self.store, items, customer=self.customer, timeout=20)
            status = response.status_code
            if status == 202:
                order = response.json()
                self.accepted[order["order_id"]] = items
                if order["status"] != "pending" or order["items"] != [{"sku": s, "quantity": q} for s, q in items]:
                    self.anomalies.append(f"202 with {order}")
        except httpx.HTTPError as exc:  # refused or broken off: the order may or may not exist
            status = type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - a 202 the client cannot read, whatever the error
            status = type(exc).__name__
            self.anomalies.append(repr(exc))
        finally:
            self._slots.release()
        self.outcomes.append(Outcome(sent, loop.time(), status))

    async def wait_accepted(self, count: int, timeout: float = 30) -> None:
        """Until `count` more orders than now were accepted."""
        target = len(self.accepted) + count

        async def enough() -> None:
            assert len(self.accepted) >= target, f"only {len(self.accepted)} of {target} orders accepted"

        await eventually(enough, timeout=timeout, interval=0.05)

    def between(self, start: float, end: float) -> list[Outcome]:
        """POSTs sent and answered entirely within [start, end] (loop time)."""
        return [o for o in self.outcomes if o.sent >= start and o.done <= end]

    def refused(self) -> int:
        return sum(1 for o in self.outcomes if o.status != 202)

    def statuses(self) -> Counter[int | str]:
        return Counter(o.status for o in self.outcomes)


async def seed_stock(stack: Stack, client: httpx.AsyncClient) -> str:
    store = random_store()
    await asyncio.gather(*(put_stock(client, stack.admin, store, sku, ON_HAND) for sku in SKUS))
    return store


# ----- waiting for the outcome ---------------------------------------------------------------------
async def wait_all_final(stack: Stack, accepted: set[str], final: set[str] = FINAL,
                         timeout: float = DRAIN_TIMEOUT) -> tuple[int, list[str]]:
    """Polls until every order in the orders database (the accepted ones and any that committed
    without the client hearing 202) is final. Returns (accepted orders final, orders not final)."""
    conn = await stack.orders_db()
    statuses: dict[str, str] = {}
    try:
        async def settled() -> None:
            statuses.clear()
            statuses.update({r["order_id"]: r["status"] for r in await conn.fetch(
                "SELECT order_id::text, status FROM orders")})
            missing = accepted - statuses.keys()
            assert not missing, f"{len(missing)} accepted orders are not in the orders database"
            open_ = [i for i, s in statuses.items() if s not in final]
            assert not open_, f"{len(open_)} orders not final yet"

        try:
            await eventually(settled, timeout=timeout, interval=0.25)
        except AssertionError:
            pass
    finally:
        await conn.close()
    done = sum(1 for i in accepted if statuses.get(i) in final)
    open_ = sorted(i for i, s in statuses.items() if s not in final) + sorted(accepted - statuses.keys())
    return done, open_


async def gateway_statuses(client: httpx.AsyncClient, customer: str) -> dict[str, str]:
    """Every order of `customer` as the gateway lists it (newest first, paged)."""
    seen: dict[str, str] = {}
    cursor: str | None = None
    while True:
        params = {"customer_id": customer, "limit": "100", **({"cursor": cursor} if cursor else {})}
        response = await client.get("/orders", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        seen.update({o["order_id"]: o["status"] for o in page["items"]})
        cursor = page["next_cursor"]
        if not cursor:
            return seen


async def ready_through_gateway(stack: Stack, client: httpx.AsyncClient, timeout: float = 60) -> None:
    async def ready() -> None:
        try:
            response = await client.get("/health/ready", timeout=5)
        except httpx.HTTPError as exc:
            raise AssertionError(f"gateway not answering: {exc!r}") from None
        assert response.status_code == 200, response.text

    await eventually(ready, timeout=timeout, interval=0.25)


# ----- the effects -------------------------------------------------------------------------------
async def effect_violations(
    stack: Stack, store: str, *, cancelled_before_stock: set[str] = frozenset(),  # type: ignore[assignment]
    extra_stock_messages: int = 0,
) -> list[str]:
    """Everything that would show a message applied twice, lost, or half applied. Empty when fine.

    - the stock invariants (0 <= reserved <= on_hand, holds = reserved, the ledger replays);
    - each order was decided once: `reserved` in orders <=> `held` in stock with exactly one
      `reserved` movement per line (of the line's quantity) and its lines held; `rejected` <=>
      `rejected` with no movement; a cancel that reached stock first leaves a tombstone, nothing held;
    - the figures add up: per sku, reserved = the lines of the reserved orders, on_hand untouched;
    - each command and each answer was recorded in an inbox once per message id: stock's inbox has
      one row per PedidoCriado (+ extra commands), orders' inbox one per stock decision.
    (That nothing was dead-lettered and the queues drained is `drained`.)"""
    violations: list[str] = []
    stock = await stack.stock_db()
    orders_conn = await stack.orders_db()
    try:
        try:
            await check_stock_invariants(stock)
        except AssertionError as exc:
            violations.append(f"stock invariant: {exc}")
        orders = {r["order_id"]: r for r in await orders_conn.fetch(
            "SELECT order_id::text, store_id, status, attempt, items::text FROM orders")}
        decided = {r["order_id"]: r for r in await stock.fetch(
            "SELECT order_id::text, state, attempt FROM stock_order")}
        moves: dict[str, list[Any]] = defaultdict(list)
        for r in await stock.fetch("SELECT order_id::text, sku, kind, on_hand_delta, reserved_delta "
                                   "FROM movement WHERE order_id IS NOT NULL"):
            moves[r["order_id"]].append(r)
        holds: dict[str, dict[str, int]] = defaultdict(dict)
        for r in await stock.fetch("SELECT order_id::text, sku, quantity FROM hold"):
            holds[r["order_id"]][r["sku"]] = r["quantity"]

        expected_reserved: Counter[str] = Counter()
        for order_id, order in orders.items():
            items = {line["sku"]: line["quantity"] for line in json.loads(order["items"])}
            known = decided.get(order_id)
            state = known["state"] if known else None
            status = order["status"]
            if status == "reserved":
                if state != "held" or known["attempt"] != order["attempt"]:
                    violations.append(f"{order_id}: reserved in orders, stock has {state!r}")
                reserved_moves = Counter(m["sku"] for m in moves[order_id] if m["kind"] == "reserved")
                if reserved_moves != Counter(items.keys()):
                    violations.append(f"{order_id}: reserved movements {dict(reserved_moves)} for lines {items}")
                if any(m["kind"] != "reserved" or m["reserved_delta"] != items.get(m["sku"]) or m["on_hand_delta"]
                       for m in moves[order_id]):
                    violations.append(f"{order_id}: unexpected movements {[dict(m) for m in moves[order_id]]}")
                if holds.get(order_id, {}) != items:
                    violations.append(f"{order_id}: holds {holds.get(order_id)} for lines {items}")
                expected_reserved.update(items)
            elif status == "rejected":
                if state != "rejected":
                    violations.append(f"{order_id}: rejected in orders, stock has {state!r}")
            elif status == "cancelled" and order_id in cancelled_before_stock:
                if state != "cancelled":
                    violations.append(f"{order_id}: cancelled before stock saw it, stock has {state!r}")
            else:
                violations.append(f"{order_id}: status {status!r} is not final")
            if status != "reserved" and (moves.get(order_id) or holds.get(order_id)):
                violations.append(f"{order_id}: {status} but moved {[dict(m) for m in moves[order_id]]}, "
                                  f"holds {holds.get(order_id)}")
        strangers = decided.keys() - orders.keys()
        if strangers:
            violations.append(f"stock decided {len(strangers)} orders the orders service does not know")

        for r in await stock.fetch("SELECT sku, on_hand, reserved FROM stock_item WHERE store_id = $1", store):
            if r["on_hand"] != ON_HAND:
                violations.append(f"{r['sku']}: on_hand {r['on_hand']} != {ON_HAND}")
            if r["reserved"] != expected_reserved[r["sku"]]:
                violations.append(f"{r['sku']}: reserved {r['reserved']} != {expected_reserved[r['sku']]} "
                                  "held by reserved orders")

        stock_inbox = await stock.fetchval("SELECT count(*) FROM inbox")
        if stock_inbox != len(orders) + extra_stock_messages:
            violations.append(f"stock inbox has {stock_inbox} message ids for "
                              f"{len(orders) + extra_stock_messages} commands sent")
        answers = sum(1 for d in decided.values() if d["state"] in ("held", "rejected"))
        orders_inbox = await orders_conn.fetchval("SELECT count(*) FROM inbox")
        if orders_inbox != answers:
            violations.append(f"orders inbox has {orders_inbox} message ids for {answers} stock answers")
    finally:
        await stock.close()
        await orders_conn.close()

    return violations


async def drained(stack: Stack, timeout: float = 30) -> None:
    """Until every queue of the stack is empty: work done and acked, nothing dead-lettered."""
    async def empty() -> None:
        depth = await asyncio.to_thread(queue_depths, stack.rabbit, vhost_of(stack))  # type: ignore[arg-type]
        left = {queue: counts for queue, counts in depth.items() if any(counts)}
        assert not left, f"queues not empty (ready, unacked): {left}"

    await eventually(empty, timeout=timeout, interval=0.5)


# ----- the broker --------------------------------------------------------------------------------
def vhost_of(stack: Stack) -> str:
    return f"test-{stack.name}"


def ctl_rows(rabbit: Rabbit, *args: str) -> list[list[str]]:
    done = rabbit.ctl(*args, "--quiet", "--no-table-headers")
    return [line.split("\t") for line in done.stdout.splitlines() if line.strip()]


def queue_depths(rabbit: Rabbit, vhost: str) -> dict[str, tuple[int, int]]:
    rows = ctl_rows(rabbit, "list_queues", "-p", vhost, "name", "messages_ready", "messages_unacknowledged")
    return {name: (int(ready), int(unacked)) for name, ready, unacked in rows}


def consumers(rabbit: Rabbit, vhost: str) -> Counter[str]:
    return Counter(row[0] for row in ctl_rows(rabbit, "list_consumers", "-p", vhost, "queue_name"))


def connections_of_process(rabbit: Rabbit, pid: int, amqp_port: int) -> set[str]:
    """The broker's ids of the AMQP connections process `pid` has open."""
    ports = local_ports_to(pid, amqp_port)
    assert ports, f"process {pid} has no connection to port {amqp_port}"
    connections = {row[0] for row in ctl_rows(rabbit, "list_connections", "pid", "peer_port")
                   if int(row[1]) in ports}
    assert connections, f"the broker knows no connection from ports {ports}"
    return connections


def unacked_on(rabbit: Rabbit, connections: set[str]) -> int:
    """Messages delivered on `connections` and not yet acked."""
    return sum(int(unacked) for conn, unacked in ctl_rows(
        rabbit, "list_channels", "connection", "messages_unacknowledged") if conn in connections)


def local_ports_to(pid: int, remote_port: int) -> set[int]:
    """Local TCP ports of the sockets process `pid` has open to `remote_port` (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def stop_rabbit(rabbit: Rabbit, timeout: float = 60) -> None:
    """Stops the node and returns once it is gone (port closed, VM exited)."""
    pid_file = rabbit.home / "rabbitmq.pid"
    pid = int(pid_file.read_text().strip()) if pid_file.exists() else None
    rabbit.stop()
    deadline = time.monotonic() + timeout
    while port_open(rabbit.port) or (pid is not None and _alive(pid)):
        if time.monotonic() > deadline:
            raise AssertionError(f"RabbitMQ still up {timeout} s after stop")
        time.sleep(0.1)

