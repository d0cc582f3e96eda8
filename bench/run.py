"""`python -m bench.run`: starts a fresh system (tooling.stack.Stack), measures the idle stack,
closed-loop clients and open-loop load on it, then the pgbench ceiling on the same PostgreSQL,
and writes bench/results/.

    python -m bench.run [--scenarios idle,closed,closed-flash,uniform,...] [--clients 1,8,64]
                        [--rates 100,200,400] [--profile]
                        [--duration 8] [--workers 2] [--quick] [--url http://127.0.0.1:8000]

Everything is bounded (load, drains, pgbench) and every stack is stopped in a finally."""

import argparse
import asyncio
import os
import sys
import time
import traceback
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import uvloop

from bench import ceiling, report
from bench.closed import closed_flash_point, closed_point, idle_point
from bench.probes import server_pids
from bench.scenarios import (
    Knobs,
    Target,
    flash_point,
    mixed_point,
    several_stores_point,
    uniform_point,
)
from shared.runtime import tune_gc
from shared.settings import Settings
from tooling.devenv import local_servers

SCENARIOS = ("idle", "closed", "closed-flash", "uniform", "flash-sale", "several-stores", "mixed", "scale")
CLOSED = ("idle", "closed", "closed-flash")  # share one stack (bench/closed.py)
# `scale` starts a stack per worker count (~2 min more): asked for by name, to keep `make bench`
# within ~10 minutes.
DEFAULT = tuple(name for name in SCENARIOS if name != "scale")
LOOPBACK = ("127.0.0.1", "localhost")

FULL = {"rates": "100,250,500,750,1000", "duration": 8.0, "flash_orders": 10_000, "flash_units": 500,
        "flash_rate": 1000.0, "mixed_rate": 500.0, "scale_rate": 500.0, "scale_workers": "1,2,4",
        "ceiling_seconds": 10, "drain_timeout": 120.0, "skus": 10_000, "clients": "1,8,64",
        "closed_duration": 10.0, "closed_skus": 2000, "closed_flash_clients": 128,
        "closed_flash_orders": 5000, "closed_flash_units": 500, "idle_seconds": 10.0}
QUICK = {"rates": "50,100", "duration": 3.0, "flash_orders": 1000, "flash_units": 50,
         "flash_rate": 500.0, "mixed_rate": 100.0, "scale_rate": 100.0, "scale_workers": "1,2",
         "ceiling_seconds": 3, "drain_timeout": 60.0, "skus": 2000, "clients": "1,8",
         "closed_duration": 3.0, "closed_skus": 500, "closed_flash_clients": 32,
         "closed_flash_orders": 500, "closed_flash_units": 50, "idle_seconds": 3.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(DEFAULT),
                   help=f"comma-separated, of {', '.join(SCENARIOS)} (default %(default)s)")
    p.add_argument("--rates", help=f"uniform's offered orders/s (default {FULL['rates']})")
    p.add_argument("--duration", type=float, help="seconds of load per rate (default 8)")
    p.add_argument("--workers", type=int, default=Settings().stock_workers,
                   help="stock workers (default STOCK_WORKERS, 2; scale varies it)")
    p.add_argument("--quick", action="store_true", help="a short smoke run (~2 minutes)")
    p.add_argument("--skus", type=int, help="items in the uniform/mixed stores (default 10,000; "
                   "--quick 2,000: seeding's outbox takes ~1 s per 1,000 items to drain)")
    p.add_argument("--sample", type=float, default=0.1, help="share of orders long-polled (default 0.1)")
    p.add_argument("--flash-orders", type=int)
    p.add_argument("--flash-units", type=int)
    p.add_argument("--flash-rate", type=float)
    p.add_argument("--mixed-rate", type=float, help="requests/s, 80%% reads (default 500)")
    p.add_argument("--scale-rate", type=float)
    p.add_argument("--scale-workers")
    p.add_argument("--clients", help="closed: client loops per point (default 1,8,64)")
    p.add_argument("--closed-duration", type=float, help="closed: seconds per point (default 10)")
    p.add_argument("--closed-skus", type=int, help="closed: items in the store (default 2,000)")
    p.add_argument("--closed-flash-clients", type=int, help="closed-flash: client loops (default 128)")
    p.add_argument("--closed-flash-orders", type=int, help="closed-flash: orders in all (default 5,000)")
    p.add_argument("--closed-flash-units", type=int, help="closed-flash: units of the sku (default 500)")
    p.add_argument("--stack-per-scenario", action="store_true",
                   help="a fresh stack for each scenario (default: one for all but scale)")
    p.add_argument("--profile", action="store_true",
                   help="closed: py-spy --native on every Python service (slows them: shares only)")
    p.add_argument("--idle-seconds", type=float, help="idle: seconds measured (default 10)")
    p.add_argument("--ceiling-seconds", type=int)
    p.add_argument("--no-ceiling", action="store_true", help="skip pgbench")
    p.add_argument("--drain-timeout", type=float, help="max seconds to wait for decisions after the load")
    p.add_argument("--url", help="use this running gateway instead of starting stacks (loopback only)")
    p.add_argument("--admin-token", help="with --url (default: ADMIN_TOKEN or .run/admin-token)")
    p.add_argument("--orders-dsn", help="with --url (default: ORDERS_DATABASE_URL)")
    p.add_argument("--stock-dsn", help="with --url (default: STOCK_DATABASE_URL)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.rates = [float(r) for r in args.rates.split(",")]
    args.scale_workers = [int(w) for w in args.scale_workers.split(",")]
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.url and urlsplit(args.url).hostname not in LOOPBACK:
        p.error("--url must point at 127.0.0.1: the benchmark sends traffic to loopback only")
    return args


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


@contextmanager
def system(args: argparse.Namespace, workers: int) -> Iterator[Target]:
    """The running system given by --url, or a fresh stack (own databases, vhost, ports)."""
    if args.url:
        settings = Settings()
        token = args.admin_token or settings.resolved_admin_token()
        pg, rabbit = local_servers(settings)
        admin_dsn = pg.admin_dsn() if pg is not None and pg.password_file.exists() else None
        yield Target(args.url.rstrip("/"), {"Authorization": f"Bearer {token}"},
                     args.orders_dsn or settings.orders_database_url,
                     args.stock_dsn or settings.stock_database_url, None,
                     server_pids(pg, rabbit), admin_dsn=admin_dsn)
        return
    from tooling.stack import Stack

    stack = Stack(f"bench{uuid.uuid4().hex[:8]}", workers=workers)
    try:
        say(f"starting a stack with {workers} stock worker(s)")
        stack.start()
        assert stack.pg is not None
        # Our PostgreSQL and RabbitMQ by pid: other checkouts' servers on this machine never count.
        pids = {name: proc.pid for name, proc in stack.procs.items()} | server_pids(stack.pg, stack.rabbit)
        yield Target(stack.url, stack.admin, stack.orders_dsn, stack.stock_dsn, workers, pids,
                     stack.pg.admin_dsn())
    finally:
        stack.stop()


STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[bench {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def describe(label: str, point: dict[str, Any]) -> None:
    server = point.get("server_latency_ms") or {}
    client = (point.get("client_latency_ms") or {}).get("decision") or {}
    say(f"{label}: accepted {point.get('accepted_per_s')}/s, settled {point.get('settled_per_s')}/s, "
        f"server p50/p99 {server.get('p50')}/{server.get('p99')} ms, client p50/p99 "
        f"{client.get('p50')}/{client.get('p99')} ms, errors {point.get('error_count')}, "
        f"undecided {point.get('undecided')}, invariants {'ok' if point['invariants'].get('ok') else 'FAILED'}")


def run_scenario(name: str, args: argparse.Namespace, knobs: Knobs, points: list[dict[str, Any]],
                 shared: Target | None = None) -> None:
    """Appends each measured point to `points` as soon as it is done (kept if a later one fails).
    Runs on `shared` if given, else on a stack of its own."""
    def record(label: str, point: dict[str, Any]) -> None:
        points.append(point)
        describe(label, point)

    if name == "scale":
        if args.url:
            raise NotImplementedError("scale starts its own stacks; not available with --url")
        for workers in args.scale_workers:
            with system(args, workers) as target:
                record(f"scale {workers} worker(s) @ {args.scale_rate:g}/s",
                       _run(uniform_point(target, args.scale_rate, knobs)))
        return
    with nullcontext(shared) if shared else system(args, args.workers) as target:
        if name == "uniform":
            for rate in args.rates:
                record(f"uniform @ {rate:g}/s", _run(uniform_point(target, rate, knobs)))
        elif name == "flash-sale":
            record(f"flash-sale {args.flash_orders} orders for {args.flash_units} units",
                   _run(flash_point(target, args.flash_orders, args.flash_units, args.flash_rate, knobs)))
        elif name == "several-stores":  # the flash sale's sizes, over 3 stores
            record(f"several-stores {args.flash_orders} orders for {args.flash_units} units in 3 stores",
                   _run(several_stores_point(target, args.flash_orders, args.flash_units, args.flash_rate,
                                             knobs)))
        elif name == "mixed":
            record(f"mixed @ {args.mixed_rate:g} requests/s", _run(mixed_point(target, args.mixed_rate, knobs)))


def run_closed(args: argparse.Namespace, knobs: Knobs, wanted: list[str],
               bodies: dict[str, dict[str, Any]], shared: Target | None = None) -> None:
    """idle, closed and closed-flash on one stack (in that order: idle before any load)."""
    closed = replace(knobs, duration=args.closed_duration, skus=args.closed_skus)
    with nullcontext(shared) if shared else system(args, args.workers) as target:
        for name in wanted:
            points = bodies[name]["points"]
            if name == "idle":
                point = _run(idle_point(target, args.idle_seconds))
                points.append(point)
                say(f"idle: the stack used {100 * point['stack_share_of_one_core']:.2f}% of one core")
            elif name == "closed":
                for clients in args.clients:
                    profile = report.RESULTS / "profiles" if args.profile else None
                    point = _run(closed_point(target, clients, args.closed_skus, closed, profile))
                    points.append(point)
                    describe_closed(f"closed, {clients} client loop(s)", point)
            else:
                point = _run(closed_flash_point(target, args.closed_flash_clients, args.closed_flash_orders,
                                                args.closed_flash_units, closed))
                points.append(point)
                describe_closed(f"closed flash sale, {args.closed_flash_clients} clients", point)


def describe_closed(label: str, point: dict[str, Any]) -> None:
    client = (point.get("client_latency_ms") or {}).get("decision") or {}
    per_order = report.cpu_ms_per_order(point)
    say(f"{label}: {point.get('orders_per_s')} orders/s, client p50/p95/p99 {client.get('p50')}/"
        f"{client.get('p95')}/{client.get('p99')} ms, CPU ms per order {per_order}, errors "
        f"{point.get('error_count')}, invariants {'ok' if point['invariants'].get('ok') else 'FAILED'}")


def run_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    pg, _ = local_servers(Settings())
    if pg is None or not pg.password_file.exists():
        return {"error": "no local PostgreSQL superuser (the ceiling needs the project's own server)"}
    say(f"ceiling: pgbench {args.ceiling_seconds} s uniform, then {args.ceiling_seconds} s hot")
    return ceiling.run_ceiling(pg.admin_dsn(), seconds=args.ceiling_seconds)


def run_all(args: argparse.Namespace, knobs: Knobs, results: dict[str, Any]) -> bool:
    """Every scenario asked for, the results written after each; True if one failed."""
    failed = False
    closed = [name for name in args.scenarios if name in CLOSED]
    units = ([closed] if closed else []) + [[name] for name in args.scenarios if name not in CLOSED]
    with ExitStack() as stacks:
        # One stack for every scenario (each point still has a store of its own): starting one
        # costs seconds on a quiet machine but minutes on a loaded one. `scale` makes its own.
        shared = None
        if not args.stack_per_scenario and any(name != "scale" for name in args.scenarios):
            shared = stacks.enter_context(system(args, args.workers))
        for names in units:
            say(f"scenario {', '.join(names)}")
            bodies: dict[str, dict[str, Any]] = {name: {"points": []} for name in names}
            results["scenarios"].update(bodies)
            try:
                if names == closed:
                    run_closed(args, knobs, names, bodies, shared)
                else:
                    run_scenario(names[0], args, knobs, bodies[names[0]]["points"], shared)
            except NotImplementedError as exc:
                bodies[names[0]]["error"] = str(exc)
            except Exception as exc:  # noqa: BLE001 - reported, and the other scenarios still run
                traceback.print_exc()
                for body in bodies.values():
                    body["error"] = f"{type(exc).__name__}: {exc}"
                failed = True
            failed |= any(not p.get("invariants", {"ok": True}).get("ok")
                          for body in bodies.values() for p in body["points"])
            report.write_all(results)
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tune_gc()  # the load generator shares the cores with the system: it should cost little
    knobs = Knobs(duration=args.duration, skus=args.skus, sample=args.sample,
                  drain_timeout=args.drain_timeout)
    if not args.url:
        from tooling.stack import ensure_infrastructure

        ensure_infrastructure()
    results: dict[str, Any] = {
        "machine": report.machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("admin_token",)}
        | {"target": args.url or ("a fresh stack per scenario" if args.stack_per_scenario
                                 else "one fresh stack for every scenario (scale: one per worker count)")},
        "scenarios": {},
    }
    if not args.no_ceiling:  # first, on a quiet server: the ratios exist even if a long run is cut
        try:
            results["ceiling"] = run_ceiling(args)
        except Exception as exc:  # noqa: BLE001 - reported in the results
            traceback.print_exc()
            results["ceiling"] = {"error": f"{type(exc).__name__}: {exc}"}
    failed = run_all(args, knobs, results)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    for path in report.write_all(results):
        say(f"wrote {path}")
    if failed:
        say("some invariant failed or a scenario did not complete: see latest.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
