"""Throughput of one system on single-node servers against the same system on the HA servers, in
one run (docs/SCALING.md, HA section): a closed loop of CLIENTS clients, each posting an order and
long-polling it until stock decided, for SECONDS on each.

    python -m tooling.ha_compare [--clients 16] [--seconds 20]

Uses the local servers of the environment (`make infra`) and the HA test servers it starts under
RUN_DIR/hacompare on free ports (stopped at the end)."""

import argparse
import asyncio
import statistics
import time
import uuid
from pathlib import Path

import httpx

from shared.settings import Settings
from tooling.formation import Formation
from tooling.ha import RabbitCluster, Servers, free_low_port, start
from tooling.stack import Stack


async def closed_loop(stack: Stack, clients: int, seconds: float) -> tuple[int, list[float]]:
    """Orders decided and their POST-to-decision latencies (s)."""
    store = f"S-{uuid.uuid4().hex[:6]}"
    latencies: list[float] = []
    async with stack.client() as client:
        for i in range(20):
            response = await client.put(f"/stores/{store}/stock/SKU-{i:03d}", headers=stack.admin,
                                        json={"on_hand": 1_000_000})
            response.raise_for_status()
        deadline = time.monotonic() + seconds

        async def one_client(n: int) -> None:
            while time.monotonic() < deadline:
                began = time.monotonic()
                body = {"customer_id": f"c-{n}", "store_id": store,
                        "items": [{"sku": f"SKU-{(n + len(latencies)) % 20:03d}", "quantity": 1}]}
                try:
                    created = await client.post("/orders", json=body)
                    if created.status_code != 202:
                        continue
                    order = await client.get(f"/orders/{created.json()['order_id']}", params={"wait": "10"})
                except httpx.HTTPError:
                    continue
                if order.json()["status"] in ("reserved", "rejected"):
                    latencies.append(time.monotonic() - began)

        await asyncio.gather(*(one_client(n) for n in range(clients)))
    return len(latencies), latencies


def measure(stack: Stack, clients: int, seconds: float) -> str:
    stack.start()
    try:
        asyncio.run(closed_loop(stack, clients, 3))  # warm up
        count, latencies = asyncio.run(closed_loop(stack, clients, seconds))
    finally:
        stack.stop()
    p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
    p99 = statistics.quantiles(latencies, n=100)[98] * 1000 if len(latencies) > 100 else float("nan")
    return f"{count / seconds:.0f} orders/s, p50 {p50:.0f} ms, p99 {p99:.0f} ms ({count} orders)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    single = Stack(f"c{uuid.uuid4().hex[:8]}", workers=2)
    print(f"single-node: {measure(single, args.clients, args.seconds)}", flush=True)

    run_dir = Path(Settings().run_dir).resolve() / "hacompare"
    ports: list[int] = []
    for _ in range(9):
        ports.append(free_low_port(set(ports) | {p + d for p in ports for d in range(100, 121)}))
    servers = Servers(Formation(run_dir, ports[6], (ports[7], ports[8])),
                      RabbitCluster(run_dir, tuple(ports[0:3]), tuple(ports[3:6]), prefix="hacompare-"))
    try:
        start(servers)
        settings = Settings(run_dir=run_dir, amqp_url=servers.cluster.urls("guest", "guest"),
                            orders_database_url=servers.formation.dsn("orders", "orders", "orders"),
                            stock_database_url=servers.formation.dsn("stock", "stock", "stock"))
        replicated = Stack(f"c{uuid.uuid4().hex[:8]}", workers=2, settings=settings,
                           pg=servers.formation, rabbit=servers.cluster)
        print(f"HA: {measure(replicated, args.clients, args.seconds)}", flush=True)
    finally:
        servers.cluster.stop()
        servers.formation.stop()


if __name__ == "__main__":
    main()
