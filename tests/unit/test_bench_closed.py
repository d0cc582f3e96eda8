"""The closed-loop benchmark's pure parts: the client loops, the cost per order, the ratios, the
process counters and the profile summary. No servers."""

import asyncio
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from bench import costs, probes, profile, report
from bench.closed import Jobs, closed_loop, idle_figures
from bench.run import parse_args


async def test_each_client_waits_for_its_order_before_the_next_and_c_are_in_flight_at_most() -> None:
    in_flight, peak, done = 0, 0, []

    async def job(i: int) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        done.append(i)

    result = await closed_loop(4, job, count=40)
    assert sorted(done) == list(range(40))
    assert peak == 4
    assert (result.started, result.completed, result.cancelled) == (40, 40, 0)
    assert result.wall_s >= 0.1  # 40 jobs of 10 ms on 4 loops: at least 10 rounds


async def test_a_slow_server_slows_a_closed_loop_down() -> None:
    """Unlike the open loop: one client with 50 ms answers does ~1/0.05 orders per second."""
    async def slow(i: int) -> None:
        await asyncio.sleep(0.05)

    result = await closed_loop(1, slow, duration=0.3)
    assert 4 <= result.completed <= 7


async def test_at_the_end_of_the_duration_orders_in_flight_finish_and_no_new_one_starts() -> None:
    started: list[int] = []

    async def job(i: int) -> None:
        started.append(i)
        await asyncio.sleep(0.2)

    result = await closed_loop(3, job, duration=0.1)
    assert result.started == 3 and result.completed == 3 and result.cancelled == 0
    assert result.wall_s >= 0.2


async def test_stragglers_are_cancelled_after_the_grace_and_a_failing_job_is_raised() -> None:
    async def hangs(i: int) -> None:
        await asyncio.sleep(60)

    result = await closed_loop(2, hangs, duration=0.05, grace=0.1)
    assert result.cancelled == 2 and result.completed == 0

    async def broken(i: int) -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await closed_loop(1, broken, count=1)


async def test_a_loop_needs_clients_and_an_end() -> None:
    async def job(i: int) -> None:
        return None

    with pytest.raises(ValueError):
        await closed_loop(0, job, count=1)
    with pytest.raises(ValueError):
        await closed_loop(1, job)


def test_jobs_are_numbered_until_the_count_or_the_stop() -> None:
    jobs = Jobs(2)
    assert [jobs.take(), jobs.take(), jobs.take()] == [0, 1, None]
    unlimited = Jobs(None)
    assert unlimited.take() == 0
    unlimited.stop()
    assert unlimited.take() is None


def _closed(clients: int, per_s: float, orders: int, seconds: dict[str, float]) -> dict:
    return {"loop": "closed", "clients": clients, "orders_per_s": per_s, "orders_in_db": orders,
            "cpu_seconds": seconds, "statuses": {"reserved": orders}, "invariants": {"ok": True},
            "client_latency_ms": {"decision": {"count": orders, "p50": 20.0, "p95": 30.0,
                                               "p99": 40.0, "max": 50.0}},
            "database_counters": {"orders transactions": 2.0 * orders},
            "process_counters": {"orders": {"wakeups": 3.0 * orders, "syscalls_write": orders}}}


def test_cost_per_order_sums_workers_and_tells_ours_from_the_rest_of_the_machine() -> None:
    point = _closed(1, 30.0, 100, {"orders": 0.5, "worker-0": 0.2, "worker-1": 0.3,
                                   "postgresql": 0.6, "machine": 3.0})
    cost = costs.per_order(point)
    assert cost["stock workers"] == 5.0 and cost["postgresql"] == 6.0
    assert cost["ours"] == 16.0 and cost["others"] == 14.0
    assert costs.per_order({"orders_in_db": 0, "cpu_seconds": {"orders": 1.0}}) == {}


def test_counters_per_order() -> None:
    counters = costs.counters_per_order(_closed(1, 30.0, 10, {}))
    assert counters == {"orders transactions": 2.0, "orders wake-ups": 3.0, "orders write syscalls": 1.0}


def _results() -> dict:
    return {
        "machine": {"date": "2026-01-01", "nproc": 2, "command": "python -m bench.run"},
        "settings": {"duration": 8, "workers": 2, "sample": 0.1, "skus": 2000, "target": "stack"},
        "scenarios": {
            "idle": {"points": [{"seconds": 10.0, "stack_share_of_one_core": 0.05,
                                 "cpu_share_of_one_core": {"orders": 0.03, "machine": 0.5}}]},
            "closed": {"points": [_closed(1, 30.0, 300, {"orders": 3.0, "machine": 9.0}),
                                  _closed(64, 200.0, 2000, {"orders": 8.0, "machine": 20.0})]},
            "closed-flash": {"points": [_closed(128, 300.0, 5000, {"orders": 10.0, "machine": 20.0})]},
        },
        "ceiling": {"uniform": {"tps": 1000.0}, "hot": {"tps": 600.0}},
    }


def test_ratios_take_the_most_clients_the_hot_row_and_the_cheapest_order() -> None:
    ratios = costs.closed_ratios(_results())
    assert ratios["closed_64_clients_vs_pgbench_uniform"]["ratio"] == pytest.approx(0.2)
    assert ratios["closed_flash_sale_vs_pgbench_hot"]["ratio"] == pytest.approx(0.5)
    cpu = ratios["cpu_per_order_one_client_vs_cheapest"]
    assert (cpu["one_client_ms"], cpu["cheapest_ms"], cpu["ratio"]) == (10.0, 2.0, 5.0)


def test_the_report_has_the_closed_tables_the_idle_stack_and_the_curve(tmp_path: Path) -> None:
    written = report.write_all(_results(), tmp_path)
    text = (tmp_path / "latest.md").read_text()
    assert "## closed (closed loop" in text and "## closed-flash" in text
    assert "| 64 | 2,000 | 200.0 | 20 / 30 / 40 / 50 | 4.00 (6.00) |" in text
    assert "**5.00% of one core**" in text
    assert "closed_64_clients_vs_pgbench_uniform" in text and "**5.0×**" in text
    assert (tmp_path / "cpu_per_order.png") in written
    assert (tmp_path / "cpu_per_order.png").read_bytes()[:4] == b"\x89PNG"


def test_closed_options_and_their_quick_defaults() -> None:
    assert parse_args([]).clients == [1, 8, 64]
    args = parse_args(["--quick", "--clients", "2,4", "--profile"])
    assert args.clients == [2, 4] and args.profile and args.closed_duration == 3.0
    assert "idle" in args.scenarios and "closed-flash" in args.scenarios


def test_a_process_and_its_children_are_counted_as_one_server_and_strangers_not_at_all() -> None:
    parent = subprocess.Popen(["sh", "-c", "sleep 5 & sleep 5; wait"])
    stranger = subprocess.Popen(["sleep", "5"])
    try:
        asyncio.run(asyncio.sleep(0.2))
        parts = probes.snapshot({"postgresql": parent.pid, "orders": os.getpid() + 10**7})
        assert set(parts) == {"postgresql", "bench-client", "machine"}
        assert parts["postgresql"]["wakeups"] >= 1  # the shell waited for its children
        assert probes.difference({"a": {"cpu_s": 2.5}}, {"a": {"cpu_s": 1.0}}) == {"a": {"cpu_s": 1.5}}
    finally:
        for proc in (parent, stranger):
            proc.kill()
            proc.wait()



def test_a_server_helper_that_ends_within_the_run_is_counted() -> None:
    """Like the Erlang VM RabbitMQ 3.10 boots every minute: a grandchild that lives half a second,
    never seen alive by a snapshot; its CPU reaches the server's part through the process that
    waited for it."""
    parent = subprocess.Popen(["sh", "-c", "sleep 0.3; sh -c 'timeout 0.5 sh -c \"while :; do :; done\"'; sleep 10"])
    try:
        before = probes.snapshot({"rabbitmq": parent.pid})
        deadline = time.monotonic() + 5
        burnt = 0.0
        while burnt < 0.1 and time.monotonic() < deadline:
            burnt = probes.difference(probes.snapshot({"rabbitmq": parent.pid}), before)["rabbitmq"]["cpu_s"]
            time.sleep(0.05)
        assert burnt >= 0.1
    finally:
        parent.kill()
        parent.wait()


def test_the_idle_stack_is_the_sum_of_its_processes_shares_not_of_rounded_ones() -> None:
    """Idle services use a few ten-thousandths of a core each: rounded to thousandths first,
    seven of them would add up to nothing."""
    parts = {name: {"cpu_s": 0.024} for name in ("orders", "stock-api", "worker-0", "worker-1", "gateway",
                                                 "postgresql", "rabbitmq")}
    usage = probes.Usage(wall_s=60.0, parts=parts | {"machine": {"cpu_s": 30.0}, "bench-client": {"cpu_s": 6.0}})
    figures = idle_figures(usage)
    assert figures["stack_share_of_one_core"] == pytest.approx(7 * 0.024 / 60, abs=1e-4)
    assert figures["cpu_share_of_one_core"]["gateway"] == pytest.approx(0.0004)

def test_profile_samples_go_to_their_system_call_library_and_own_caller(tmp_path: Path) -> None:
    raw = tmp_path / "orders.txt"
    raw.write_text(
        "main (orders/main.py:1);OutboxRelay.flush (shared/outbox.py:133);"
        "Connection.fetch (asyncpg/connection.py:717);write (libc.so.6) 6\n"
        "main (orders/main.py:1);fetch_order (orders/db.py:9);Connection.fetch (asyncpg/connection.py:7) 3\n"
        "run (uvloop/loop.pyx:1);epoll_pwait (libc.so.6) 9\n"
        "main (orders/main.py:1);apply (orders/service.py:5) 1\n")
    stacks = profile.read_stacks(raw)
    assert sum(stacks.values()) == 19
    summary = profile.summarize(stacks)
    assert summary["samples"] == 10 and summary["epoll_samples"] == 9
    assert summary["where"] == {"syscall write": 0.6, "asyncpg": 0.3, "orders/service.py": 0.1}
    assert summary["via"]["OutboxRelay.flush (shared/outbox.py)"] == 0.6
    assert summary["writes_via"] == {"OutboxRelay.flush (shared/outbox.py)": 0.6}
    assert summary["syscall_share"] == 0.6
    assert profile.summarize(Counter()) == {"samples": 0}
