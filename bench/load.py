"""Open-loop load and latency recording.

Request i leaves at t0 + i/rate whatever happened to the requests before it, and every latency
is measured from that intended time. A closed loop (send, wait, send the next) slows down with
the server and never records the time a request spent waiting to be sent: coordinated omission,
which makes a saturated system look fast. Here a server that falls behind shows it as latency.
The generator's own lateness (time sent - intended time) is reported too: if the generator
cannot keep up, the figures say so."""

import asyncio
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson

PERCENTILES = (50, 95, 99)
JSON_HEADERS = {"Content-Type": "application/json"}
UNSETTLED = ("pending", "confirming")

Fire = Callable[[int, float], Awaitable[None]]


def intended_times(rate: float, count: int, t0: float = 0.0) -> list[float]:
    """When each of `count` requests is due at `rate` per second, starting at `t0`."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    return [t0 + i / rate for i in range(count)]


def summarize(values_ms: Iterable[float]) -> dict[str, Any]:
    """count, p50/p95/p99, max and mean of latencies in milliseconds (None when empty)."""
    values = np.fromiter(values_ms, dtype=float)
    if values.size == 0:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    p50, p95, p99 = np.percentile(values, PERCENTILES)
    return {"count": int(values.size), "p50": round(float(p50), 1), "p95": round(float(p95), 1),
            "p99": round(float(p99), 1), "max": round(float(values.max()), 1),
            "mean": round(float(values.mean()), 1)}


@dataclass
class Recorder:
    """What the client saw: latencies by name (ms), counters, errors by kind."""

    latencies: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    last_accept: float | None = None  # loop time of the last 202

    def latency(self, name: str, intended: float) -> None:
        self.latencies[name].append((asyncio.get_running_loop().time() - intended) * 1000)

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def summary(self) -> dict[str, Any]:
        return {"latency_ms": {name: summarize(v) for name, v in sorted(self.latencies.items())},
                "counts": dict(self.counts), "errors": dict(self.errors)}


@dataclass
class LoopResult:
    t0: float            # loop time of request 0's intended send
    sent: int
    unfinished: int      # still running at the end of the grace period: cancelled
    send_lag_ms: dict[str, Any]


async def open_loop(rate: float, count: int, fire: Fire, recorder: Recorder, grace: float) -> LoopResult:
    """Calls `fire(i, intended)` for each request at its intended time, never waiting for the
    ones before it, then gives the stragglers `grace` seconds before cancelling them."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.02
    tasks: set[asyncio.Task[None]] = set()
    lags: list[float] = []
    late_streak = 0
    for i, intended in enumerate(intended_times(rate, count, t0)):
        delay = intended - loop.time()
        if delay > 0:
            late_streak = 0
            await asyncio.sleep(delay)
        else:
            late_streak += 1
            if late_streak % 64 == 0:
                await asyncio.sleep(0)  # behind schedule: still let responses be read
        lags.append((loop.time() - intended) * 1000)
        task = loop.create_task(_guarded(fire, i, intended, recorder))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    unfinished = 0
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=grace)
        unfinished = len(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    if unfinished:
        recorder.errors["unfinished (cancelled at the end)"] += unfinished
    return LoopResult(t0=t0, sent=count, unfinished=unfinished, send_lag_ms=summarize(lags))


async def _guarded(fire: Fire, i: int, intended: float, recorder: Recorder) -> None:
    try:
        await fire(i, intended)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug in a scenario must not stop the loop; it is reported
        recorder.error(f"client exception {type(exc).__name__}")


def new_session(limit: int) -> aiohttp.ClientSession:
    """aiohttp: a Python client fast enough to generate load (httpx is not, here)."""
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, keepalive_timeout=30)
    return aiohttp.ClientSession(connector=connector)


async def call(
    session: aiohttp.ClientSession, method: str, url: str, recorder: Recorder, label: str,
    expect: int, timeout: float, body: Any = None,
) -> Any | None:
    """One request; the JSON answer when the status is `expect`, else None with the error counted."""
    data = orjson.dumps(body) if body is not None else None
    try:
        async with session.request(method, url, data=data, headers=JSON_HEADERS if data else None,
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            payload = await response.read()
            if response.status != expect:
                recorder.error(f"{label} HTTP {response.status}")
                return None
            return orjson.loads(payload) if payload else {}
    except TimeoutError:
        recorder.error(f"{label} timeout")
    except aiohttp.ClientError as exc:
        recorder.error(f"{label} {type(exc).__name__}")
    return None


async def wait_decision(
    session: aiohttp.ClientSession, base: str, order_id: str, recorder: Recorder, deadline_s: float,
    wait: float = 30.0,
) -> dict[str, Any] | None:
    """Long-polls `GET /orders/{id}?wait=` (at most `wait` s a call) until the order left
    pending/confirming, or the deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while (remaining := end - loop.time()) > 0:
        seconds = min(wait, max(1.0, remaining))
        order = await call(session, "GET", f"{base}/orders/{order_id}?wait={seconds:.0f}", recorder,
                           "GET /orders/{id}?wait", 200, timeout=seconds + 15)
        if order is None:
            return None
        if order["status"] not in UNSETTLED:
            return order
    recorder.error("decision not seen before the client deadline")
    return None
