"""Every Prometheus metric family of the system (API.md §5), in one place.

The families are built unregistered and each process exposes only the ones it records
(`expose`): a stock API showing `holds_total` at zero, while the workers that decide holds
were not scraped at all, is how an operator gets misled. Counters that describe a database
change are added only once its transaction committed (`after_commit`), so a rolled-back or
retried batch is not counted twice. Gauges that describe shared state (outbox backlog, oldest
pending order, dead-letter depth) are computed when Prometheus scrapes (`on_scrape`), from one
cheap query each, not kept up to date on the hot path."""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token
from datetime import UTC, datetime

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

log = logging.getLogger(__name__)

# The label names are the contract (API.md §5): dashboards and alert rules under deploy/ use them.
HTTP_REQUESTS = Counter("http_requests_total", "HTTP requests answered",
                        ["service", "method", "route", "status"], registry=None)
HTTP_LATENCY = Histogram("http_request_duration_seconds", "HTTP request latency, by route template",
                         ["service", "route"], registry=None)
ORDER_STATUS = Counter("orders_status_total", "Orders entering each status", ["status"], registry=None)
DECISION_LATENCY = Histogram(
    "reservation_decision_seconds", "From PedidoCriado written to the stock decision committed",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=None,
)
HOLDS = Counter("holds_total", "Holds decided (held, rejected) and ended (sold, released, expired)",
                ["outcome"], registry=None)
MESSAGES_CONSUMED = Counter(
    "messages_consumed_total", "Messages settled by a consumer: acked, returned to the queue "
    "(redelivered) or dead-lettered", ["queue", "type", "outcome"], registry=None)
OUTBOX_BACKLOG = Gauge("outbox_backlog", "Outbox rows waiting to be published (all of them)",
                       ["lane"], registry=None)
OUTBOX_OLDEST = Gauge("outbox_oldest_seconds", "Age of the oldest outbox row waiting (0: none)",
                      ["lane"], registry=None)
OUTBOX_SET_ASIDE_ROWS = Gauge("outbox_set_aside_rows",
                              "Outbox rows the broker refused, set aside (see `dlq outbox`)", registry=None)
OUTBOX_REFUSED = Counter("outbox_refused_total", "Publishes of outbox rows the broker refused, by this "
                         "process's relay", ["lane"], registry=None)
OUTBOX_SET_ASIDE = Counter("outbox_set_aside_total", "Outbox rows this process's relay set aside after "
                           "the broker refused them", ["lane"], registry=None)
PENDING_OLDEST = Gauge("orders_pending_oldest_seconds",
                       "How long the oldest order still pending has waited for its decision (0: none)",
                       registry=None)
HOLDS_OVERDUE = Gauge("holds_overdue_seconds", "How long the most overdue hold has been past its "
                      "reserved_until without being expired (0: none); the sweep falling behind",
                      registry=None)
DEAD_LETTERS = Gauge("dead_letter_messages", "Messages in each dead-letter queue", ["queue"],
                     registry=None)
ASKED_AGAIN = Counter("orders_asked_again_total",
                      "Unsettled orders whose command was sent again (orders/reconciler.py)",
                      ["event"], registry=None)
RETENTION_DELETED = Counter("retention_deleted_total",
                            "Rows deleted by retention (API.md §6): idempotency keys, inbox, tombstones",
                            ["kind"], registry=None)

HTTP = (HTTP_REQUESTS, HTTP_LATENCY)
OUTBOX = (OUTBOX_BACKLOG, OUTBOX_OLDEST, OUTBOX_SET_ASIDE_ROWS)
RELAY = (OUTBOX_REFUSED, OUTBOX_SET_ASIDE)  # every process that runs a relay (shared/outbox.py)
FAMILIES: dict[str, tuple[MetricWrapperBase, ...]] = {
    "gateway": HTTP,
    "orders": (*HTTP, ORDER_STATUS, PENDING_OLDEST, MESSAGES_CONSUMED, *OUTBOX, *RELAY, DEAD_LETTERS,
               ASKED_AGAIN, RETENTION_DELETED),
    "stock": (*HTTP, *RELAY),
    "stock-worker": (DECISION_LATENCY, HOLDS, HOLDS_OVERDUE, MESSAGES_CONSUMED, *OUTBOX, *RELAY,
                     DEAD_LETTERS, RETENTION_DELETED),
}

_exposed: set[int] = set()


def expose(service: str) -> None:
    """Registers the families `service` records (idempotent: tests build several apps)."""
    for family in FAMILIES[service]:
        if id(family) not in _exposed:
            REGISTRY.register(family)
            _exposed.add(id(family))


# ----- counted after commit ---------------------------------------------------------------------
_pending: ContextVar[list[Callable[[], None]] | None] = ContextVar("metrics_pending", default=None)


class after_commit:
    """Wrap a transaction (outermost, so it exits after the commit): what `hold`, `decided` and
    `order_status` record inside is applied only if the block exits normally (committed), and
    dropped if it raised (rolled back, perhaps to be retried)."""

    def __init__(self) -> None:
        self._pending: list[Callable[[], None]] = []
        self._token: Token[list[Callable[[], None]] | None] | None = None

    def __enter__(self) -> None:
        self._token = _pending.set(self._pending)

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if self._token is not None:
            _pending.reset(self._token)
        if kind is None:
            for record in self._pending:
                record()

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self.__exit__(kind, *rest)


def _record(record: Callable[[], None]) -> None:
    pending = _pending.get()
    if pending is None:
        record()
    else:
        pending.append(record)


def hold(outcome: str, n: int = 1) -> None:
    _record(lambda: HOLDS.labels(outcome).inc(n))


def decided(since: datetime) -> None:
    """A decision on an order whose PedidoCriado was written at `since`: timed to the commit."""
    _record(lambda: DECISION_LATENCY.observe(max(0.0, (datetime.now(UTC) - since).total_seconds())))


def order_status(status: str, n: int = 1) -> None:
    _record(lambda: ORDER_STATUS.labels(status).inc(n))


def consumed(queue: str, event_type: str | None, outcome: str) -> None:
    MESSAGES_CONSUMED.labels(queue, event_type or "unknown", outcome).inc()


# ----- gauges computed at scrape time -----------------------------------------------------------
Refresh = Callable[[], Awaitable[None]]
_refreshers: list[Refresh] = []
# Several Prometheus servers (or a dashboard and Prometheus) scraping at once share one refresh.
MIN_REFRESH_SECONDS = 1.0
REFRESH_TIMEOUT_SECONDS = 3.0
_last_refresh = 0.0
_refreshing: asyncio.Lock | None = None


def on_scrape(refresh: Refresh) -> Callable[[], None]:
    """Runs `refresh` before each scrape (at most once a second); returns its remover."""
    _refreshers.append(refresh)
    return lambda: _refreshers.remove(refresh) if refresh in _refreshers else None


async def _refresh_all() -> None:
    global _last_refresh, _refreshing
    _refreshing = _refreshing or asyncio.Lock()
    async with _refreshing:
        if time.monotonic() - _last_refresh < MIN_REFRESH_SECONDS:
            return
        results = await asyncio.gather(
            *(asyncio.wait_for(r(), REFRESH_TIMEOUT_SECONDS) for r in list(_refreshers)),
            return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                # The gauge keeps its last value; the process's readiness reports the outage.
                log.warning("a metric could not be refreshed", extra={"error": repr(result)})
        _last_refresh = time.monotonic()


async def render() -> tuple[bytes, str]:
    """The Prometheus text exposition and its content type, gauges refreshed first."""
    await _refresh_all()
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
