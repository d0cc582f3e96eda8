"""The benchmark's pure parts: the open-loop schedule, percentiles, pgbench parsing and the
report rendered from a made-up result. No servers."""

import asyncio
import json
from pathlib import Path

import pytest

from bench import ceiling, report
from bench.load import Recorder, intended_times, open_loop, summarize
from bench.run import parse_args
from bench.scenarios import mixed_plans, sample_every


def test_request_i_is_due_at_t0_plus_i_over_rate() -> None:
    times = intended_times(rate=200, count=5, t0=10.0)
    assert times == pytest.approx([10.0, 10.005, 10.010, 10.015, 10.020])


def test_a_schedule_needs_a_positive_rate() -> None:
    with pytest.raises(ValueError):
        intended_times(rate=0, count=3)


async def test_open_loop_fires_on_schedule_and_hands_each_request_its_intended_time() -> None:
    fired: list[tuple[int, float, float]] = []
    loop = asyncio.get_running_loop()

    async def fire(i: int, intended: float) -> None:
        fired.append((i, intended, loop.time()))

    result = await open_loop(rate=500, count=20, fire=fire, recorder=Recorder(), grace=5)
    assert result.sent == 20 and result.unfinished == 0
    assert [i for i, _, _ in fired] == list(range(20))
    for i, intended, at in fired:
        assert intended == pytest.approx(result.t0 + i / 500)
        assert at >= intended - 0.002  # never early
    assert result.send_lag_ms["count"] == 20


async def test_a_slow_answer_does_not_hold_back_the_next_request() -> None:
    """Open loop: 20 requests that each take 0.3 s, at 100/s, are all sent within ~0.2 s."""
    loop = asyncio.get_running_loop()
    sent_at: list[float] = []

    async def slow(i: int, intended: float) -> None:
        sent_at.append(loop.time())
        await asyncio.sleep(0.3)

    started = loop.time()
    await open_loop(rate=100, count=20, fire=slow, recorder=Recorder(), grace=5)
    assert max(sent_at) - started < 0.25
    assert loop.time() - started < 1.0  # not 20 x 0.3 s


async def test_latency_counts_from_the_intended_time_not_from_when_it_was_sent() -> None:
    recorder = Recorder()
    loop = asyncio.get_running_loop()
    recorder.latency("decision", loop.time() - 0.5)  # it was due 0.5 s ago
    assert recorder.latencies["decision"][0] == pytest.approx(500, abs=20)


async def test_stragglers_are_cancelled_after_the_grace_period_and_counted() -> None:
    recorder = Recorder()

    async def hangs(i: int, intended: float) -> None:
        await asyncio.sleep(60)

    result = await open_loop(rate=1000, count=3, fire=hangs, recorder=recorder, grace=0.1)
    assert result.unfinished == 3
    assert sum(recorder.errors.values()) == 3


async def test_a_failing_request_is_counted_not_raised() -> None:
    recorder = Recorder()

    async def broken(i: int, intended: float) -> None:
        raise KeyError("boom")

    await open_loop(rate=1000, count=4, fire=broken, recorder=recorder, grace=1)
    assert recorder.errors == {"client exception KeyError": 4}


def test_percentiles_of_one_to_a_hundred() -> None:
    summary = summarize(range(1, 101))
    assert summary["count"] == 100
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p95"] == pytest.approx(95.0, abs=0.1)
    assert summary["p99"] == pytest.approx(99.0, abs=0.1)
    assert summary["max"] == 100
    assert summary["mean"] == pytest.approx(50.5)


def test_percentiles_of_nothing_are_none() -> None:
    assert summarize([]) == {
        "count": 0,
        "p50": None,
        "p95": None,
        "p99": None,
        "max": None,
        "mean": None,
    }


def test_sampling_every_nth_order() -> None:
    assert sample_every(0.1) == 10
    assert sample_every(1.0) == 1
    assert sample_every(0) == 0


def test_mixed_plans_are_mostly_reads_and_repeatable() -> None:
    skus = [f"SKU-{n:05d}" for n in range(100)]
    plans = mixed_plans(2000, skus, "seed", read_share=0.8, confirm_share=0.4, cancel_share=0.3)
    reads = sum(p.kind == "read" for p in plans) / len(plans)
    assert 0.75 < reads < 0.85
    assert all(len(set(p.skus)) == 3 for p in plans)
    assert plans == mixed_plans(2000, skus, "seed", 0.8, 0.4, 0.3)


def test_quick_fills_in_short_defaults_and_explicit_options_win() -> None:
    args = parse_args(["--quick", "--rates", "10,20"])
    assert args.rates == [10.0, 20.0]
    assert args.duration == 3.0 and args.flash_orders == 1000 and args.scale_workers == [1, 2]
    assert parse_args([]).rates == [100.0, 250.0, 500.0, 750.0, 1000.0]


def test_only_loopback_targets() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--url", "http://example.com:8000"])


PGBENCH_OUTPUT = """\
transaction type: reserve.sql
scaling factor: 1
query mode: simple
number of clients: 16
number of threads: 2
maximum number of tries: 1
duration: 10 s
number of transactions actually processed: 12345
number of failed transactions: 0 (0.000%)
latency average = 12.961 ms
initial connection time = 20.532 ms
tps = 1234.567890 (without initial connection time)
"""


def test_pgbench_summary_is_parsed() -> None:
    assert ceiling.parse_pgbench(PGBENCH_OUTPUT) == {
        "tps": 1234.56789,
        "latency_avg_ms": 12.961,
        "transactions": 12345,
        "failed": 0,
    }


def test_the_uniform_ceiling_script_locks_three_rows_in_key_order() -> None:
    script = ceiling.UNIFORM_SCRIPT
    assert "ORDER BY store_id, sku FOR UPDATE" in script
    assert script.count("BEGIN;") == 1 and script.count("COMMIT;") == 1
    assert "INSERT INTO outbox" in script and "INSERT INTO hold" in script


def _point(rate: float, settled: float, workers: int = 3) -> dict:
    latency = {"count": 10, "p50": 20.0, "p95": 40.0, "p99": 60.0, "max": 80.0, "mean": 25.0}
    return {
        "offered_rate": rate,
        "workers": workers,
        "sent": int(rate * 8),
        "accepted": int(rate * 8),
        "accepted_per_s": float(rate),
        "settled_per_s": settled,
        "undecided": 0,
        "statuses": {"reserved": int(rate * 8)},
        "server_latency_ms": latency,
        "client_latency_ms": {"decision": latency, "accept": latency},
        "errors": {},
        "error_count": 0,
        "send_lag_ms": latency,
        "client_counts": {},
        "invariants": {"ok": True},
    }


def fake_results() -> dict:
    return {
        "machine": {
            "date": "2026-01-01T00:00:00+00:00",
            "nproc": 2,
            "python": "3.11.7",
            "command": "python -m bench.run",
        },
        "settings": {"duration": 8, "workers": 3, "sample": 0.1, "skus": 10000, "target": "stack"},
        "scenarios": {
            "uniform": {"points": [_point(100, 99.0), _point(200, 150.0)]},
            "flash-sale": {
                "points": [
                    {
                        **_point(1000, 300.0),
                        "invariants": {
                            "ok": False,
                            "flash_sale_exact": False,
                            "stock_invariants": True,
                        },
                    }
                ]
            },
            "scale": {"points": [_point(400, 100.0, 1), _point(400, 180.0, 2)]},
        },
        "ceiling": {
            "uniform": {"tps": 1500.0, "latency_avg_ms": 10.0, "failed": 0, "command": "pgbench"},
            "hot": {"tps": 600.0, "latency_avg_ms": 26.0, "failed": 0},
        },
    }


def test_ratios_use_the_best_uniform_rate_and_the_hot_ceiling_for_the_flash_sale() -> None:
    ratios = report.compute_ratios(fake_results())
    assert ratios["uniform_best_vs_pgbench_uniform"]["ratio"] == pytest.approx(0.1)
    assert ratios["flash_sale_vs_pgbench_hot"]["ratio"] == pytest.approx(0.5)


def test_markdown_has_a_table_per_scenario_the_ceiling_and_the_failures() -> None:
    results = fake_results()
    results["ratios"] = report.compute_ratios(results)
    text = report.render_markdown(results)
    for heading in ("## uniform", "## flash-sale", "## scale", "## Ceiling"):
        assert heading in text
    assert "| 200 | 1,600 | 200.0 | 150.0 | 20 / 40 / 60 / 80 |" in text
    assert "**FAILED** flash_sale_exact" in text
    assert "| 2 @ 400/s |" in text and "| workers @ offered/s |" in text
    assert "nproc 2" in text and "3.11.7" in text


def test_a_check_left_undone_is_shown_not_failed() -> None:
    results = fake_results()
    point = results["scenarios"]["uniform"]["points"][0]
    point["invariants"] = {"ok": True, "stock_invariants": True, "reserved_and_sold_match_orders": None}
    text = report.render_markdown(results)
    assert "ok (not checked: reserved_and_sold_match_orders)" in text


def test_everything_is_written_with_plots(tmp_path: Path) -> None:
    written = report.write_all(fake_results(), tmp_path)
    names = {p.name for p in written}
    assert {
        "latest.json",
        "latest.md",
        "uniform_throughput.png",
        "uniform_latency.png",
        "scale_throughput.png",
    } <= names
    assert json.loads((tmp_path / "latest.json").read_text())["ratios"]
    assert (tmp_path / "uniform_latency.png").read_bytes()[:4] == b"\x89PNG"


def test_cpu_ms_per_order_sums_workers_and_keeps_the_machine_last() -> None:
    point = {"orders_in_db": 500, "cpu_seconds": {
        "orders": 0.5, "worker-0": 0.25, "worker-1": 0.5, "gateway": 1.0, "machine": 4.0, "idle": 0.0}}
    per_order = report.cpu_ms_per_order(point)
    assert per_order == {"gateway": 2.0, "stock workers": 1.5, "orders": 1.0, "machine": 8.0}
    assert list(per_order)[-1] == "machine"
    assert report.cpu_ms_per_order({"orders_in_db": 0, "cpu_seconds": {"orders": 1.0}}) == {}


def test_the_benchmark_imports_nothing_from_the_tests() -> None:
    """bench/ ships without tests/: what both need (the stock invariants) lives in tooling/."""
    import ast

    bench = Path(__file__).resolve().parents[2] / "bench"
    for path in bench.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "tests" or n.startswith("tests.") for n in names), (path.name, names)
