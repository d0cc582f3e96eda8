"""Closed-loop clients, as the design card's client behaves: each of C clients POSTs an order,
long-polls `GET /orders/{id}?wait=10` until it is decided, then sends its next order.

A closed loop slows down with the server and hides the wait a queued request would have had
(coordinated omission): its latencies are those of C real users, not of an arrival schedule —
that is why the open-loop scenarios stay next to it. What it shows that they cannot: the cost of
an order when only C are in flight, so every hop works in batches of at most C.

- `closed`: C = each of `--clients`, 3-line orders (3 distinct random skus) over `--closed-skus`;
- `closed-flash`: `--closed-flash-clients` loops share `--closed-flash-orders` one-unit orders
  for ONE sku with `--closed-flash-units` units: exactly that many reserved;
- `idle`: the CPU of the whole stack with no load at all (measured on the closed loops' stack)."""

import asyncio
import random
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load import call, wait_decision
from bench.probes import Usage, database_usage, process_usage
from bench.profile import profiled, summarize_files
from bench.scenarios import AMPLE, Knobs, Run, Target, _invariants_ok, run_context, seed
from bench.server import check_invariants, new_store, order_outcomes, wait_drained

POLL_WAIT = 10.0  # seconds, as the client: GET /orders/{id}?wait=10
Job = Callable[[int], Awaitable[None]]


@dataclass
class ClosedResult:
    clients: int
    started: int       # jobs taken
    completed: int     # jobs that returned
    wall_s: float      # first job taken -> last job done
    cancelled: int     # still running at the end of the grace period


class Jobs:
    """Hands out job numbers 0, 1, ... until `count` (None: no limit) or until `stop()`."""

    def __init__(self, count: int | None) -> None:
        self.count, self.next, self.stopped = count, 0, False

    def take(self) -> int | None:
        if self.stopped or (self.count is not None and self.next >= self.count):
            return None
        self.next += 1
        return self.next - 1

    def stop(self) -> None:
        self.stopped = True


async def closed_loop(clients: int, job: Job, *, count: int | None = None,
                      duration: float | None = None, grace: float = 60.0) -> ClosedResult:
    """Runs `clients` loops; each awaits `job(i)` for the next i, one at a time, until `count`
    jobs were taken or `duration` seconds passed (jobs in flight then still finish, within
    `grace`). A job that raises is a bug in the scenario: it is re-raised."""
    if clients < 1 or (count is None and duration is None):
        raise ValueError("need at least one client and a count or a duration")
    loop = asyncio.get_running_loop()
    jobs, done = Jobs(count), [0]
    started = loop.time()

    async def client() -> None:
        while (i := jobs.take()) is not None:
            await job(i)
            done[0] += 1

    tasks = [loop.create_task(client()) for _ in range(clients)]
    if duration is not None:
        await asyncio.wait(tasks, timeout=duration)
        jobs.stop()
    finished, pending = await asyncio.wait(tasks, timeout=grace)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in finished:
        task.result()
    return ClosedResult(clients, jobs.next, done[0], round(loop.time() - started, 3), len(pending))


async def order_job(run: Run, i: int, lines: list[tuple[str, int]]) -> None:
    """One client's order: POST, then long-poll until decided; latency from the POST's start."""
    loop = asyncio.get_running_loop()
    sent = loop.time()
    body = {"customer_id": f"c-{i % 1000}", "store_id": run.store,
            "items": [{"sku": sku, "quantity": q} for sku, q in lines]}
    order = await call(run.post, "POST", f"{run.target.url}/orders", run.rec, "POST /orders", 202,
                       run.knobs.request_timeout, body)
    if order is None:
        return
    run.rec.latency("accept", sent)
    run.rec.counts["accepted"] += 1
    decided = await wait_decision(run.poll, run.target.url, order["order_id"], run.rec,
                                  run.knobs.decision_deadline, wait=POLL_WAIT)
    if decided is not None:
        run.rec.latency("decision", sent)
        run.rec.counts[decided["status"]] += 1


async def measure_closed(target: Target, store: str, knobs: Knobs, clients: int,
                         plan: Callable[[int], list[tuple[str, int]]], initial: dict[str, int],
                         count: int | None = None, duration: float | None = None,
                         profile_dir: Path | None = None) -> dict[str, Any]:
    """Runs the loops while counting every process's CPU, wake-ups and system calls and the
    databases' transactions (and, with `profile_dir`, sampling each Python service with
    py-spy), then checks the outcome against the invariants."""
    sampling = (profiled(target.pids, duration or knobs.duration, profile_dir, f"closed-{clients}")
                if profile_dir else nullcontext({}))
    async with run_context(target, store, knobs) as run:
        async with (database_usage(target.admin_dsn, [target.orders_dsn, target.stock_dsn]) as db,
                    process_usage(target.pids) as usage):
            with sampling as stacks:
                result = await closed_loop(clients, lambda i: order_job(run, i, plan(i)),
                                           count=count, duration=duration, grace=knobs.grace)
        undrained = await wait_drained(target.orders_dsn, store, knobs.drain_timeout)
        outcome = await order_outcomes(target.orders_dsn, store)
        invariants = await check_invariants(target.orders_dsn, target.stock_dsn, store, initial,
                                            compare_with_orders=undrained == 0)
    client = run.rec.summary()
    decided = client["latency_ms"].get("decision", {}).get("count", 0)
    return {
        "loop": "closed", "clients": clients, "workers": target.workers, "store": store,
        "sent": result.started, "completed": result.completed, "wall_s": result.wall_s,
        "cancelled": result.cancelled,
        "orders_per_s": round(decided / result.wall_s, 1) if result.wall_s > 0 else None,
        **outcome,
        "still_unsettled_after_drain": undrained,
        "client_latency_ms": client["latency_ms"], "client_counts": client["counts"],
        "errors": client["errors"], "error_count": sum(client["errors"].values()),
        "cpu_share_of_one_core": usage.cores(), "cpu_seconds": usage.cpu_seconds(),
        "process_counters": usage.parts, "database_counters": db,
        "invariants": invariants,
    } | ({"profile": summarize_files(stacks)} if profile_dir else {})


async def closed_point(target: Target, clients: int, skus: int, knobs: Knobs,
                       profile_dir: Path | None = None) -> dict[str, Any]:
    store = new_store()
    names = [f"SKU-{n:05d}" for n in range(skus)]
    initial = dict.fromkeys(names, AMPLE)
    seeded = await seed(target, store, initial)
    rng = random.Random(f"closed-{clients}")
    plans: dict[int, list[tuple[str, int]]] = {}

    def plan(i: int) -> list[tuple[str, int]]:
        return plans.setdefault(i, [(sku, 1) for sku in rng.sample(names, 3)])

    point = await measure_closed(target, store, knobs, clients, plan, initial, duration=knobs.duration,
                                 profile_dir=profile_dir)
    point["seed"] = seeded
    point["invariants"]["ok"] = _invariants_ok(point, no_rejections=True)
    return point


async def closed_flash_point(target: Target, clients: int, orders: int, units: int,
                             knobs: Knobs) -> dict[str, Any]:
    store, sku = new_store(), "FLASH-1"
    initial = {sku: units}
    seeded = await seed(target, store, initial)
    point = await measure_closed(target, store, knobs, clients, lambda i: [(sku, 1)], initial, count=orders)
    point["seed"] = seeded
    statuses, inv = point["statuses"], point["invariants"]
    inv["flash_sale_expected"] = {"reserved": units, "rejected": orders - units}
    inv["flash_sale_exact"] = None if point["still_unsettled_after_drain"] else (
        statuses.get("reserved", 0) == units and statuses.get("rejected", 0) == point["orders_in_db"] - units)
    inv["all_orders_decided"] = point["decided"] == orders
    inv["ok"] = _invariants_ok(point) and inv["flash_sale_exact"] is not False and inv["all_orders_decided"]
    return point


async def idle_point(target: Target, seconds: float, settle: float = 3.0) -> dict[str, Any]:
    """The stack with nothing to do: the CPU its background loops cost (relay looks, sweeps,
    status polls), measured after `settle` seconds of quiet."""
    await asyncio.sleep(settle)
    async with process_usage(target.pids) as usage:
        await asyncio.sleep(seconds)
    return idle_figures(usage)


def idle_figures(usage: Usage) -> dict[str, Any]:
    # Idle processes use a few ten-thousandths of a core each: a thousandth would round most to 0.
    cores = usage.cores(digits=5)
    ours = sum(v for k, v in cores.items() if k not in ("machine", "bench-client"))
    return {"seconds": usage.wall_s, "cpu_share_of_one_core": cores,
            "stack_share_of_one_core": round(ours, 4), "process_counters": usage.parts}
