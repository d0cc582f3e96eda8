"""The scenarios. Each measured run (a "point") gets a store of its own, seeds it through
`POST /stock/import`, offers load open-loop, waits (bounded) for every order to be decided, then
reads the outcome from the orders database and checks the invariants.

- uniform: 3-line orders (3 distinct random skus, 1 unit each) over 10,000 skus with ample stock;
- flash-sale: many 1-unit orders for ONE sku with few units: exactly `units` must be reserved;
- mixed: 80% stock reads, 20% orders; of the reserved orders some are confirmed, some cancelled;
- several-stores: a flash sale over 3 stores, every order listing all three (the hot store first
  for a third of them), split allowed: exactly the units of the three stores must be reserved.
`scale` is `uniform` on stacks with different worker counts (see bench/run.py)."""

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp

from bench.load import Fire, Recorder, call, new_session, open_loop, wait_decision
from bench.server import (
    check_invariants,
    cpu_usage,
    database_waits,
    new_store,
    order_outcomes,
    outbox_backlog,
    wait_drained,
    wait_outbox_empty,
)

AMPLE = 1_000_000


@dataclass
class Target:
    """A running system: the gateway and, for the server-side figures, its two databases."""

    url: str
    admin: dict[str, str]
    orders_dsn: str
    stock_dsn: str
    workers: int | None = None
    pids: dict[str, int] = field(default_factory=dict)  # the system's processes, when we started them
    admin_dsn: str | None = None  # the PostgreSQL superuser, to see every session's wait events


@dataclass
class Knobs:
    """How long and how hard; every wait in a run is bounded by one of these."""

    duration: float = 8.0
    skus: int = 10_000             # items of the uniform and mixed stores
    sample: float = 0.1            # share of orders whose decision the client long-polls
    drain_timeout: float = 120.0   # after the load: wait this long at most for decisions
    request_timeout: float = 30.0
    decision_deadline: float = 60.0

    @property
    def grace(self) -> float:
        return self.request_timeout + 2 * self.decision_deadline + 10


@dataclass
class Run:
    """What the requests of one point share."""

    target: Target
    store: str
    knobs: Knobs
    rec: Recorder
    post: aiohttp.ClientSession
    poll: aiohttp.ClientSession


@asynccontextmanager
async def run_context(target: Target, store: str, knobs: Knobs) -> AsyncIterator[Run]:
    # Long-polls hold their connections: they get a session of their own, so they never make a
    # submit queue for a connection.
    post, poll = new_session(1000), new_session(4000)
    try:
        yield Run(target, store, knobs, Recorder(), post, poll)
    finally:
        await post.close()
        await poll.close()


async def seed(target: Target, store: str, on_hand: dict[str, int]) -> dict[str, float]:
    """Loads the store's items with one CSV import (one transaction, COPY on the server), then
    waits until the import's EstoqueAlterado events left the stock outbox, so that the load
    starts on a quiet system. Returns how long each took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    csv = "store_id,sku,on_hand\n" + "".join(f"{store},{sku},{n}\n" for sku, n in on_hand.items())
    async with aiohttp.ClientSession() as session, session.post(
        f"{target.url}/stock/import", data=csv.encode(),
        headers={**target.admin, "Content-Type": "text/csv"}, timeout=aiohttp.ClientTimeout(total=120),
    ) as response:
        if response.status != 200:
            raise RuntimeError(f"seeding failed: {response.status} {(await response.text())[:300]}")
    imported = round(loop.time() - started, 2)
    drained = await wait_outbox_empty(target.stock_dsn, timeout=180)
    return {"items": len(on_hand), "import_s": imported, "outbox_drain_s": drained}


def sample_every(share: float) -> int:
    """Follow every n-th order: share 0.1 -> every 10th; share 0 -> none."""
    return max(1, round(1 / share)) if share > 0 else 0


async def place_order(run: Run, i: int, intended: float, lines: list[tuple[str, int]],
                      follow: bool, where: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """POST /orders (to the run's store, or `where`: stores and split); when `follow`, long-polls
    the decision. Returns the decided order, if seen."""
    body = {"customer_id": f"c-{i % 1000}", **(where or {"store_id": run.store}),
            "items": [{"sku": sku, "quantity": q} for sku, q in lines]}
    order = await call(run.post, "POST", f"{run.target.url}/orders", run.rec, "POST /orders", 202,
                       run.knobs.request_timeout, body)
    if order is None:
        return None
    run.rec.latency("accept", intended)
    run.rec.counts["accepted"] += 1
    run.rec.last_accept = asyncio.get_running_loop().time()
    if not follow:
        return None
    decided = await wait_decision(run.poll, run.target.url, order["order_id"], run.rec,
                                  run.knobs.decision_deadline)
    if decided is not None:
        run.rec.latency("decision", intended)
    return decided


async def measure(target: Target, store: str, knobs: Knobs, rate: float, count: int,
                  make_fire: Callable[[Run], Fire], initial: dict[str, int],
                  decided_at: dict[str, datetime] | None = None) -> dict[str, Any]:
    """Offers the load, waits (bounded) for the decisions while sampling the outboxes, then reads
    the outcome from the orders database and checks the invariants."""
    async with run_context(target, store, knobs) as run:
        async with (outbox_backlog(target.orders_dsn, target.stock_dsn) as backlog,
                    cpu_usage(target.pids) as cpu,
                    database_waits(target.admin_dsn, [target.orders_dsn, target.stock_dsn]) as waits):
            loop = await open_loop(rate, count, make_fire(run), run.rec, knobs.grace)
            undrained = await wait_drained(target.orders_dsn, store, knobs.drain_timeout)
        outcome = await order_outcomes(target.orders_dsn, store, decided_at)
        invariants = await check_invariants(target.orders_dsn, target.stock_dsn, store, initial,
                                            compare_with_orders=undrained == 0)
    accepted = run.rec.counts.get("accepted", 0)
    span = (run.rec.last_accept - loop.t0) if run.rec.last_accept is not None else 0
    client = run.rec.summary()
    return {
        "offered_rate": rate,
        "workers": target.workers,
        "store": store,
        "sent": loop.sent,
        "duration_s": round(loop.sent / rate, 2),
        "accepted": accepted,
        "accepted_per_s": round(accepted / span, 1) if span > 0 else None,
        **outcome,
        "still_unsettled_after_drain": undrained,
        "client_latency_ms": client["latency_ms"],
        "client_counts": client["counts"],
        "errors": client["errors"],
        "error_count": sum(client["errors"].values()),
        "send_lag_ms": loop.send_lag_ms,
        "outbox_backlog": backlog,
        "cpu_share_of_one_core": cpu["cores"],
        "cpu_seconds": cpu["seconds"],
        "database_sessions": waits,
        "invariants": invariants,
    }


async def uniform_point(target: Target, rate: float, knobs: Knobs) -> dict[str, Any]:
    store = new_store()
    skus = [f"SKU-{n:05d}" for n in range(knobs.skus)]
    initial = dict.fromkeys(skus, AMPLE)
    seeded = await seed(target, store, initial)
    rng = random.Random(f"uniform-{rate}")
    count = max(1, int(rate * knobs.duration))
    plans = [[(sku, 1) for sku in rng.sample(skus, 3)] for _ in range(count)]
    every = sample_every(knobs.sample)

    def make_fire(run: Run) -> Fire:
        async def fire(i: int, intended: float) -> None:
            await place_order(run, i, intended, plans[i], follow=bool(every) and i % every == 0)
        return fire

    point = await measure(target, store, knobs, rate, count, make_fire, initial)
    point["seed"] = seeded
    point["invariants"]["ok"] = _invariants_ok(point, no_rejections=True)
    return point


async def flash_point(target: Target, orders: int, units: int, rate: float, knobs: Knobs) -> dict[str, Any]:
    store = new_store()
    sku = "FLASH-1"
    initial = {sku: units}
    seeded = await seed(target, store, initial)
    every = sample_every(knobs.sample)

    def make_fire(run: Run) -> Fire:
        async def fire(i: int, intended: float) -> None:
            await place_order(run, i, intended, [(sku, 1)], follow=bool(every) and i % every == 0)
        return fire

    point = await measure(target, store, knobs, rate, orders, make_fire, initial)
    point["seed"] = seeded
    statuses, inv = point["statuses"], point["invariants"]
    # Exactly `units` held, every other order that got in rejected. Whether all `orders` got in
    # (within the client's timeout) is capacity, reported apart: a missing order is not a wrong one.
    inv["flash_sale_expected"] = {"reserved": units, "rejected": orders - units}
    inv["flash_sale_not_oversold"] = statuses.get("reserved", 0) <= units
    inv["flash_sale_exact"] = None if point["still_unsettled_after_drain"] else (
        statuses.get("reserved", 0) == units
        and statuses.get("rejected", 0) == point["orders_in_db"] - units)
    point["all_orders_accepted"] = point["orders_in_db"] == orders
    inv["ok"] = (_invariants_ok(point) and inv["flash_sale_not_oversold"]
                 and inv["flash_sale_exact"] is not False)
    return point


async def several_stores_point(target: Target, orders: int, units: int, rate: float,
                               knobs: Knobs) -> dict[str, Any]:
    """Many several-store orders sharing one hot store: they must batch like a flash sale."""
    hot = new_store()
    stores = [hot, f"{hot}-b", f"{hot}-c"]
    sku = "FLASH-1"
    stock = {hot: units - 2 * (units // 5), stores[1]: units // 5, stores[2]: units // 5}
    seeded = {s: await seed(target, s, {sku: n}) for s, n in stock.items()}
    every = sample_every(knobs.sample)

    def make_fire(run: Run) -> Fire:
        async def fire(i: int, intended: float) -> None:
            order = {"stores": stores[i % 3:] + stores[:i % 3], "split": True}
            await place_order(run, i, intended, [(sku, 1)], follow=bool(every) and i % every == 0,
                              where=order)
        return fire

    point = await measure(target, hot, knobs, rate, orders, make_fire, {sku: stock[hot]})
    point["seed"] = seeded
    statuses, inv = point["statuses"], point["invariants"]
    inv["flash_sale_not_oversold"] = statuses.get("reserved", 0) <= units
    inv["flash_sale_exact"] = None if point["still_unsettled_after_drain"] else (
        statuses.get("reserved", 0) == units and statuses.get("rejected", 0) == point["orders_in_db"] - units)
    inv["ok"] = (_invariants_ok(point) and inv["flash_sale_not_oversold"]
                 and inv["flash_sale_exact"] is not False)
    return point


@dataclass
class MixedPlan:
    kind: str                  # "read" or "order"
    skus: list[str]
    then: str                  # for a reserved order: "confirm", "cancel" or "keep"


def mixed_plans(count: int, skus: list[str], seed: str, read_share: float, confirm_share: float,
                cancel_share: float) -> list[MixedPlan]:
    rng = random.Random(seed)
    plans = []
    for _ in range(count):
        roll, then = rng.random(), rng.random()
        action = ("confirm" if then < confirm_share
                  else "cancel" if then < confirm_share + cancel_share else "keep")
        plans.append(MixedPlan("read" if roll < read_share else "order",
                               rng.sample(skus, 3), action))
    return plans


async def mixed_point(target: Target, rate: float, knobs: Knobs, read_share: float = 0.8,
                      confirm_share: float = 0.4, cancel_share: float = 0.3) -> dict[str, Any]:
    store = new_store()
    skus = [f"SKU-{n:05d}" for n in range(knobs.skus)]
    initial = dict.fromkeys(skus, AMPLE)
    seeded = await seed(target, store, initial)
    count = max(1, int(rate * knobs.duration))
    plans = mixed_plans(count, skus, f"mixed-{rate}", read_share, confirm_share, cancel_share)
    decided_at: dict[str, datetime] = {}

    def make_fire(run: Run) -> Fire:
        async def fire(i: int, intended: float) -> None:
            plan = plans[i]
            if plan.kind == "read":
                if await call(run.post, "GET", f"{target.url}/stores/{store}/stock/{plan.skus[0]}",
                              run.rec, "GET stock", 200, knobs.request_timeout) is not None:
                    run.rec.latency("read", intended)
                return
            # Every order is followed: a reserved one may be confirmed or cancelled next.
            decided = await place_order(run, i, intended, [(s, 1) for s in plan.skus], follow=True)
            if decided is not None and decided["status"] == "reserved" and plan.then != "keep":
                # The decision's time, before confirm/cancel overwrites updated_at.
                decided_at[decided["order_id"]] = datetime.fromisoformat(decided["updated_at"])
                await _follow_up(run, decided["order_id"], plan.then)
        return fire

    point = await measure(target, store, knobs, rate, count, make_fire, initial, decided_at)
    point["seed"] = seeded
    point["read_share"] = read_share
    point["invariants"]["ok"] = _invariants_ok(point)
    return point


async def _follow_up(run: Run, order_id: str, action: str) -> None:
    """Confirm (then long-poll until confirmed) or cancel; timed from when it is sent, since it
    follows the decision rather than a schedule."""
    started = asyncio.get_running_loop().time()
    answer = await call(run.post, "POST", f"{run.target.url}/orders/{order_id}/{action}", run.rec,
                        f"POST {action}", 202, run.knobs.request_timeout)
    if answer is None:
        return
    if action == "cancel":
        run.rec.latency("cancel", started)
        run.rec.counts["cancelled"] += 1
        return
    done = await wait_decision(run.poll, run.target.url, order_id, run.rec, run.knobs.decision_deadline)
    if done is not None:
        run.rec.latency("confirm", started)
        run.rec.counts[f"confirm -> {done['status']}"] += 1


def _invariants_ok(point: dict[str, Any], no_rejections: bool = False) -> bool:
    inv = point["invariants"]
    # None: not checked (orders still unsettled at the drain timeout), which is not a failure.
    ok = bool(inv.get("stock_invariants")) and inv.get("reserved_and_sold_match_orders") is not False
    if no_rejections:
        inv["no_rejections_with_ample_stock"] = point["statuses"].get("rejected", 0) == 0
        ok = ok and inv["no_rejections_with_ample_stock"]
    return ok
