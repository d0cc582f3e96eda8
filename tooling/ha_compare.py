"""Throughput of one system on single-node servers against the same system on the HA servers, in
one run (docs/SCALING.md, HA section): a closed loop of CLIENTS clients, each posting an order and
long-polling it until stock decided, for SECONDS on each.

    python -m tooling.ha_compare [--clients 16] [--seconds 30] [--rounds 3]

Uses the local servers of the environment (`make infra`) and the HA test servers it starts under
RUN_DIR/hacompare on free ports (stopped at the end)."""

import argparse
import asyncio
import shutil
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


def summary(count: int, latencies: list[float], seconds: float) -> str:
    p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
    p99 = statistics.quantiles(latencies, n=100)[98] * 1000 if len(latencies) > 100 else float("nan")
    return f"{count / seconds:.1f} orders/s, p50 {p50:.0f} ms, p99 {p99:.0f} ms ({count} orders)"


def compare(stacks: dict[str, Stack], clients: int, seconds: float, rounds: int) -> None:
    """Both systems up at once, measured in alternating rounds: a machine whose load drifts
    (shared by others) weighs on both alike."""
    results: dict[str, tuple[int, list[float]]] = {name: (0, []) for name in stacks}
    for stack in stacks.values():
        asyncio.run(closed_loop(stack, clients, 3))  # warm up
    for _ in range(rounds):
        for name, stack in stacks.items():
            count, latencies = asyncio.run(closed_loop(stack, clients, seconds / rounds))
            total, seen = results[name]
            results[name] = (total + count, seen + latencies)
    for name, (count, latencies) in results.items():
        print(f"{name}: {summary(count, latencies, seconds)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30, help="per system, over all rounds")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    run_dir = Path(Settings().run_dir).resolve() / "hacompare"
    shutil.rmtree(run_dir / "ha", ignore_errors=True)  # fresh ports each run: no data to reuse
    ports: list[int] = []
    for _ in range(9):
        ports.append(free_low_port(set(ports) | {p + d for p in ports for d in range(100, 121)}))
    servers = Servers(Formation(run_dir, ports[6], (ports[7], ports[8])),
                      RabbitCluster(run_dir, tuple(ports[0:3]), tuple(ports[3:6]), prefix="hacompare-"))
    stacks: dict[str, Stack] = {}
    try:
        start(servers)
        settings = Settings(run_dir=run_dir, amqp_url=servers.cluster.urls("guest", "guest"),
                            orders_database_url=servers.formation.dsn("orders", "orders", "orders"),
                            stock_database_url=servers.formation.dsn("stock", "stock", "stock"))
        stacks["single-node"] = Stack(f"c{uuid.uuid4().hex[:8]}", workers=2).start()
        stacks["HA"] = Stack(f"c{uuid.uuid4().hex[:8]}", workers=2, settings=settings,
                             pg=servers.formation, rabbit=servers.cluster).start()
        compare(stacks, args.clients, args.seconds, args.rounds)
    finally:
        for stack in stacks.values():
            stack.stop()
        servers.cluster.stop()
        servers.formation.stop()


if __name__ == "__main__":
    main()
