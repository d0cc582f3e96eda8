"""What the HA cases share: the report, the answers seen while a node was lost, how long orders
went undecided, and the common end of every case (every 202 order final, nothing applied twice,
the invariants, via the fault suite's checkers)."""

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from tests.faults.tools import (
    FINAL,
    Load,
    drained,
    effect_violations,
    gateway_statuses,
    wait_all_final,
)
from tooling.stack import Stack


def say(message: str) -> None:
    print(f"[ha {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class HaResult:
    fault: str
    accepted: int = 0
    final: int = 0
    refused: int = 0  # POSTs answered with anything but 202 (or not answered)
    paused: float | None = None  # the longest stretch from the fault on with no order decided
    answers: str = ""  # what the refused POSTs got
    violations: list[str] = field(default_factory=list)
    notes: str = ""


RESULTS: list[HaResult] = []


def record(fault: str) -> HaResult:
    result = HaResult(fault)
    RESULTS.append(result)
    return result


def report_table() -> str:
    lines = [
        ("| fault | orders accepted | orders final | orders undecided for (s) | POSTs not 202 | "
         "their answers | invariant violations | notes |"),
        "|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in RESULTS:
        paused = "-" if r.paused is None else f"{r.paused:.1f}"
        lines.append(f"| {r.fault} | {r.accepted} | {r.final} | {paused} | {r.refused} | {r.answers or '-'} | "
                     f"{len(r.violations)} | {r.notes} |")
    return "\n".join(lines)


class Refusals:
    """An httpx response hook: every answer that is not a success must be a 503 problem+json
    with Retry-After (API.md §7: a request meeting the switch may get 503, none a wrong answer)."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.wrong: list[str] = []

    async def __call__(self, response: httpx.Response) -> None:
        if response.status_code < 400 or response.request.url.path.startswith("/health/"):
            return  # readiness probes answer 503 while a dependency is down: that is their job
        self.seen[str(response.status_code)] += 1
        content_type = response.headers.get("content-type", "")
        if response.status_code != 503 or "retry-after" not in response.headers \
                or not content_type.startswith("application/problem+json"):
            await response.aread()
            self.wrong.append(f"{response.request.method} {response.request.url.path}: "
                              f"{response.status_code} {content_type} {response.text[:200]}")


async def decisions(stack: Stack) -> list[float]:
    """When each decided order was decided (epoch seconds), in order."""
    conn = await stack.orders_db()
    try:
        rows = await conn.fetch("SELECT extract(epoch FROM updated_at)::float8 AS at FROM orders "
                                "WHERE status = ANY($1::text[]) ORDER BY 1", sorted(FINAL))
    finally:
        await conn.close()
    return [r["at"] for r in rows]


def longest_pause(times: list[float], since: float) -> float:
    """The longest stretch from `since` on without a decision (from `since` to the first one
    counts too)."""
    later = [t for t in times if t >= since]
    if not later:
        return float("inf")
    gaps = [later[0] - since] + [b - a for a, b in itertools.pairwise(later)]
    return max(gaps)


async def finish(stack: Stack, client: httpx.AsyncClient, load: Load, result: HaResult,
                 refusals: Refusals, fault_at: float) -> None:
    accepted = set(load.accepted)
    result.accepted = len(accepted)
    result.refused = load.refused()
    errors = Counter(str(o.status) for o in load.outcomes if not isinstance(o.status, int))
    result.answers = ", ".join(f"{n}× {s}" for s, n in sorted((refusals.seen + errors).items()))
    say(f"load stopped: {len(accepted)} accepted, POSTs {dict(load.statuses())}; waiting for final statuses")
    result.final, not_final = await wait_all_final(stack, accepted)
    try:
        await drained(stack, timeout=60)
    except AssertionError as exc:
        result.violations.append(str(exc))
    result.violations += await effect_violations(stack, load.store)
    result.violations += [f"POST /orders: {a}" for a in load.anomalies[:20]]
    result.violations += [f"not a 503 problem with Retry-After: {w}" for w in refusals.wrong[:20]]
    shown = await gateway_statuses(client, load.customer)
    hidden = [i for i in accepted if shown.get(i) not in FINAL]
    if hidden:
        result.violations.append(f"{len(hidden)} accepted orders not final through the gateway")
    result.paused = longest_pause(await decisions(stack), fault_at)
    say(f"orders undecided for at most {result.paused:.1f} s from the fault on")
    assert not not_final, (f"{len(not_final)} orders never reached a final status, e.g. {not_final[:3]}; "
                           f"logs in {stack.log_dir}; also: {result.violations[-3:]}")
    assert result.violations == [], result.violations[:20]


async def keep_going(load: Load, count: int, timeout: float) -> None:
    """The load goes on after the fault: `count` more orders accepted within `timeout`."""
    await load.wait_accepted(count, timeout=timeout)
    await asyncio.sleep(0)
