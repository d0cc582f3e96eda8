"""`make observe`'s Prometheus sees every process of a running system up: a stack is started,
a config generated for its ports as tooling/observe.py writes one for `make run`, and
Prometheus's own API lists each target healthy and the alert rules loaded."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.settings import Settings
from tests.helpers import eventually
from tooling.observe import config, start, targets
from tooling.stack import Stack, free_port_block

WORKERS = 2


@pytest.fixture(scope="module")
def running(infrastructure: None) -> Iterator[Stack]:
    stack = Stack(f"p{uuid.uuid4().hex[:8]}", workers=WORKERS).start()
    yield stack
    stack.stop()


async def test_prometheus_sees_every_process_up(running: Stack, tmp_path: Path) -> None:
    settings = Settings(stock_workers=WORKERS, amqp_url=running.amqp_url)
    ports = {"gateway": running.ports["gateway"], "orders": running.ports["orders"],
             "stock-api": running.ports["stock"]}
    jobs = targets(settings, worker_port=running.worker_port, ports=ports)
    assert len(jobs["stock-worker"]) == WORKERS and "rabbitmq" in jobs
    (tmp_path / "prometheus.yml").write_text(config(jobs, scrape_interval="1s"))
    port = free_port_block(1)
    server = start(tmp_path / "prometheus.yml", tmp_path / "data", port, tmp_path / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:

            async def all_up() -> list[dict]:
                try:
                    response = await client.get("/api/v1/targets")
                except httpx.TransportError as error:  # Prometheus not listening yet
                    raise AssertionError(f"prometheus not answering yet: {error!r}") from error
                assert response.status_code == 200
                active = response.json()["data"]["activeTargets"]
                assert len(active) == 3 + WORKERS + 1
                down = [(t["labels"]["job"], t["scrapeUrl"], t["lastError"])
                        for t in active if t["health"] != "up"]
                assert not down, down
                return active

            active = await eventually(all_up, timeout=60, interval=0.5)
            assert {t["labels"]["job"] for t in active} == set(jobs)
            rules = (await client.get("/api/v1/rules")).json()["data"]["groups"]
            assert sum(len(g["rules"]) for g in rules) >= 8
    finally:
        server.terminate()
        server.wait(timeout=30)
