"""The report: every figure as JSON, a Markdown summary and PNG plots, under bench/results/."""

import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import costs

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def machine_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "git_commit": git("rev-parse", "--short", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
    }


def compute_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Settled orders/s as a share of what pgbench does with the same SQL on the same server."""
    ceiling = results.get("ceiling") or {}
    scenarios = results.get("scenarios", {})
    ratios: dict[str, Any] = {}

    def ratio(name: str, settled: float | None, tps: float | None) -> None:
        if settled and tps:
            ratios[name] = {"settled_per_s": settled, "ceiling_tps": tps, "ratio": round(settled / tps, 3)}

    uniform = [p["settled_per_s"] for p in scenarios.get("uniform", {}).get("points", []) if p.get("settled_per_s")]
    ratio("uniform_best_vs_pgbench_uniform", max(uniform, default=None), (ceiling.get("uniform") or {}).get("tps"))
    flash = scenarios.get("flash-sale", {}).get("points", [])
    ratio("flash_sale_vs_pgbench_hot", flash[0].get("settled_per_s") if flash else None,
          (ceiling.get("hot") or {}).get("tps"))
    return ratios | costs.closed_ratios(results)


def write_all(results: dict[str, Any], out: Path = RESULTS) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    results["ratios"] = compute_ratios(results)
    written = []
    for name, text in (("latest.json", json.dumps(results, indent=2, default=str)),
                       ("latest.md", render_markdown(results))):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(out / name)
        written.append(out / name)
    written += write_plots(results, out)
    return written


# ----- Markdown ---------------------------------------------------------------------------------
def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _lat(summary: dict[str, Any] | None) -> str:
    if not summary or not summary.get("count"):
        return "–"
    return " / ".join(_num(summary[k], 0) for k in ("p50", "p95", "p99", "max"))


def _invariants(point: dict[str, Any]) -> str:
    inv = point.get("invariants", {})
    if inv.get("ok"):
        unchecked = [k for k, v in inv.items() if v is None]
        return "ok" + (f" (not checked: {', '.join(unchecked)})" if unchecked else "")
    failed = [k for k, v in inv.items() if v is False and k != "ok"]
    return "**FAILED** " + ", ".join(failed)


def _errors(point: dict[str, Any]) -> str:
    return _num(point.get("error_count", 0))


POINT_HEADER = ("| offered/s | sent | accepted/s | settled/s | server ms p50 / p95 / p99 / max "
                "| client ms p50 / p95 / p99 / max | accept ms p99 | errors | undecided | invariants |")


def _point_row(point: dict[str, Any], label: str) -> str:
    client = point.get("client_latency_ms", {})
    cells = [label, _num(point["sent"]),
             _num(point.get("accepted_per_s")), _num(point.get("settled_per_s")),
             _lat(point.get("server_latency_ms")), _lat(client.get("decision")),
             _num((client.get("accept") or {}).get("p99"), 0), _errors(point),
             _num(point.get("undecided")), _invariants(point)]
    return "| " + " | ".join(cells) + " |"


def _table(points: list[dict[str, Any]], scale: bool = False) -> list[str]:
    header = POINT_HEADER.replace("| offered/s |", "| workers @ offered/s |") if scale else POINT_HEADER
    lines = [header, _rule(header)]
    for point in points:
        lines.append(_point_row(point, _label(point, scale)))
    details = [f"- {_label(p, scale)}: " + ", ".join(f"{k}: {v}" for k, v in p["errors"].items())
               for p in points if p.get("errors")]
    return lines + (["", "Errors:", *details] if details else [])


def _label(point: dict[str, Any], scale: bool) -> str:
    rate = _num(point["offered_rate"], 0)
    return f"{point.get('workers')} @ {rate}/s" if scale else rate


def _rule(header: str) -> str:
    return "|" + "---|" * (header.count("|") - 1)


HOW_TO_READ = (
    "Load is open-loop: request i leaves at t0 + i/rate and every client latency counts from that "
    "intended time, so queueing anywhere (including in the client) shows. *accepted/s*: 202s per "
    "second of sending. *settled/s*: decided orders / (last decision − first created_at), on the "
    "orders database's clock, so a backlog drained after the load lowers it. *server ms*: "
    "decision `updated_at − created_at` of every decided order; *client ms*: 202 sent → decision "
    "seen through `GET /orders/{id}?wait=30`, for the sampled orders. *undecided*: still pending "
    "after the drain timeout (excluded from latencies). Under each table, sampled while the run "
    "lasted, to show where work queued: the outboxes' backlog, the busiest processes (share of one "
    "core) and the mean number of busy PostgreSQL sessions per wait event (`Client:ClientRead`: a "
    "transaction waiting for the service to send its next statement; `Lock:object`: NOTIFY's "
    "commit lock; `Lock:tuple`/`Lock:transactionid`: row locks)."
)


def render_markdown(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    s = results.get("settings", {})
    lines = [
        "# Benchmark", "",
        (f"{m.get('date')} · nproc {m.get('nproc')} · Python {m.get('python')} · {m.get('platform')} · "
         f"load average at start {m.get('load_average')} · commit {m.get('git_commit')}"
         f"{' (uncommitted changes)' if m.get('git_dirty') else ''}"), "",
        (f"`{m.get('command')}` — {s.get('duration')} s per rate, {s.get('workers')} stock workers, "
         f"{_num(s.get('skus'))} skus (uniform, mixed), {int(100 * s.get('sample', 0))}% of orders "
         f"long-polled by the client, target: {s.get('target')}. Each run has a store of its own, "
         "seeded by one CSV import; the load starts once the import's events left the stock outbox."), "",
        HOW_TO_READ, "",
    ]
    lines += costs.render(results)
    scenarios = {k: v for k, v in results.get("scenarios", {}).items() if k not in costs.CLOSED}
    for name, body in scenarios.items():
        lines += [f"## {name}", ""]
        if body.get("error"):
            lines += [f"**Did not complete:** `{body['error']}`", ""]
        points = body.get("points", [])
        if not points:
            continue
        lines += _table(points, scale=name == "scale") + [""]
        lines += _scenario_notes(name, points)
        if name == "uniform":
            lines += ["![uniform throughput](uniform_throughput.png)", "",
                      "![uniform latency](uniform_latency.png)", ""]
        if name == "scale":
            lines += ["![scale](scale_throughput.png)", ""]
    lines += _ceiling_section(results)
    return "\n".join(lines)


def _scenario_notes(name: str, points: list[dict[str, Any]]) -> list[str]:
    notes = []
    for p in points:
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(p.get("statuses", {}).items()))
        line = f"- {_label(p, name == 'scale')}{'' if name == 'scale' else '/s'}: statuses {statuses}"
        client = p.get("client_latency_ms", {})
        for extra in ("read", "confirm", "cancel"):
            if extra in client:
                line += f"; {extra} ms p50/p95/p99/max {_lat(client[extra])}"
        if name == "flash-sale":
            inv = p.get("invariants", {})
            line += (f"; expected {inv.get('flash_sale_expected')}, exact: {inv.get('flash_sale_exact')}, "
                     f"all {p.get('sent')} orders got in: {p.get('all_orders_accepted')}")
        if name == "mixed":
            line += f"; client counts {p.get('client_counts')}"
        notes.append(line)
        notes.append("  " + _diagnostics(p))
    return notes + [""]


def _diagnostics(p: dict[str, Any]) -> str:
    """Where the time went: generator lag, outbox backlogs, the busiest processes."""
    lag = p.get("send_lag_ms") or {}
    backlog = p.get("outbox_backlog") or {}
    text = (f"generator lag p99 {_num(lag.get('p99'), 0)} ms; outbox backlog max/mean: orders "
            f"{backlog.get('orders_outbox_max')}/{backlog.get('orders_outbox_mean')}, stock "
            f"{backlog.get('stock_outbox_max')}/{backlog.get('stock_outbox_mean')}")
    cores = p.get("cpu_share_of_one_core") or {}
    cpu = sorted(((k, v) for k, v in cores.items() if k != "machine"), key=lambda kv: -kv[1])
    if cpu:
        text += (f"; CPU (cores; whole machine {_num(cores.get('machine'), 2)}): "
                 + ", ".join(f"{name} {share:.2f}" for name, share in cpu[:6]))
    per_order = cpu_ms_per_order(p)
    if per_order:
        text += "; CPU ms per order: " + ", ".join(f"{name} {ms:.2f}" for name, ms in per_order.items())
    sessions = p.get("database_sessions") or {}
    if sessions:
        text += "; busy PostgreSQL sessions (mean): " + ", ".join(
            f"{name} {mean:.2f}" for name, mean in list(sessions.items())[:5])
    return text


def cpu_ms_per_order(p: dict[str, Any]) -> dict[str, float]:
    """CPU milliseconds each part spent per order that reached the database, stock workers
    summed, busiest first, the whole machine last: the budget a faster system must cut."""
    seconds = dict(p.get("cpu_seconds") or {})
    orders = p.get("orders_in_db") or 0
    if not seconds or not orders:
        return {}
    workers = sum(seconds.pop(name) for name in [n for n in seconds if n.startswith("worker-")])
    if workers:
        seconds["stock workers"] = workers
    machine = seconds.pop("machine", None)
    ranked = dict(sorted(((k, 1000 * v / orders) for k, v in seconds.items() if v > 0),
                         key=lambda kv: -kv[1]))
    if machine is not None:
        ranked["machine"] = 1000 * machine / orders
    return {k: round(v, 2) for k, v in ranked.items()}


def _ceiling_section(results: dict[str, Any]) -> list[str]:
    ceiling = results.get("ceiling")
    if not ceiling:
        return []
    lines = ["## Ceiling: pgbench, same reservation SQL, same PostgreSQL", ""]
    if ceiling.get("error"):
        return lines + [f"Not measured: {ceiling['error']}", ""]
    lines += [f"`{(ceiling.get('uniform') or {}).get('command')}` (one transaction = one order's hold)", "",
              "| workload | orders/s (tps) | avg latency ms | failed |", "|---|---|---|---|"]
    for key, label in (("uniform", "uniform: 3 of 10,000 skus"), ("hot", "hot: 1 sku"),
                       ("uniform_with_notify", "diagnostic: uniform with a NOTIFY trigger on the outbox")):
        run = ceiling.get(key)
        if run is None:
            continue
        failed = _num(run.get("failed"), 0)
        if run.get("error"):
            failed = "error: " + " ".join(run["error"].split())[:200].replace("|", "/")
        lines.append(f"| {label} | {_num(run.get('tps'))} | {_num(run.get('latency_avg_ms'))} | {failed} |")
    ratios = results.get("ratios", {})
    if ratios:
        lines += ["", "| ratio | settled orders/s | pgbench orders/s | settled ÷ pgbench |", "|---|---|---|---|"]
        for name, r in ratios.items():
            if "ceiling_tps" in r:
                lines.append(f"| {name} | {_num(r['settled_per_s'])} | {_num(r['ceiling_tps'])} | {r['ratio']:.3f} |")
        cpu = ratios.get("cpu_per_order_one_client_vs_cheapest")
        if cpu:
            lines += ["", (f"CPU per order at one client loop {cpu['one_client_ms']} ms ÷ cheapest in this "
                      f"run {cpu['cheapest_ms']} ms = **{cpu['ratio']}×** (target ≤ 3×).")]
    return lines + [""]


# ----- plots ------------------------------------------------------------------------------------
def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    scenarios = results.get("scenarios", {})
    uniform = sorted(scenarios.get("uniform", {}).get("points", []), key=lambda p: p["offered_rate"])
    if uniform:
        written.append(_throughput_plot(plt, uniform, out / "uniform_throughput.png"))
        written.append(_latency_plot(plt, uniform, out / "uniform_latency.png"))
    scale = scenarios.get("scale", {}).get("points", [])
    if scale:
        written.append(_scale_plot(plt, scale, out / "scale_throughput.png"))
    curve = costs.plot_cpu_curve(plt, results, out / "cpu_per_order.png")
    return written + ([curve] if curve else [])


def _throughput_plot(plt: Any, points: list[dict[str, Any]], path: Path) -> Path:
    offered = [p["offered_rate"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(offered, offered, ":", color="grey", label="offered (ideal)")
    ax.plot(offered, [p.get("accepted_per_s") or 0 for p in points], "o-", label="accepted (202) /s")
    ax.plot(offered, [p.get("settled_per_s") or 0 for p in points], "s-", label="settled (decided) /s")
    ax.set(xlabel="offered load (orders/s)", ylabel="orders/s", title="uniform: throughput vs offered load",
           xticks=offered)
    return _finish(plt, fig, ax, path)


def _latency_plot(plt: Any, points: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.ticker import FuncFormatter

    offered = [p["offered_rate"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for source, style, get in (
        ("server", "-", lambda p: p.get("server_latency_ms") or {}),
        ("client", "--", lambda p: (p.get("client_latency_ms") or {}).get("decision") or {}),
    ):
        for q, marker, color in (("p50", "o", "tab:blue"), ("p95", "s", "tab:orange"),
                                 ("p99", "^", "tab:red")):
            values = [get(p).get(q) for p in points]
            ax.plot(offered, [v if v is not None else float("nan") for v in values], style,
                    marker=marker, color=color, label=f"{source} {q}")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    if high / max(low, 1e-9) < 20:  # within about a decade: label the in-between ticks too
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize="x-small")
    ax.set(xlabel="offered load (orders/s)", ylabel="submit → decision (ms, log scale)",
           title="uniform: decision latency vs offered load (server solid, client dashed)",
           xticks=offered)
    ax.grid(alpha=0.3, which="both")
    ax.legend(ncol=2, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _scale_plot(plt: Any, points: list[dict[str, Any]], path: Path) -> Path:
    workers = [p.get("workers") for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(workers, [p.get("accepted_per_s") or 0 for p in points], "o-", label="accepted /s")
    ax.plot(workers, [p.get("settled_per_s") or 0 for p in points], "s-", label="settled /s")
    ax.axhline(points[0]["offered_rate"], ls=":", color="grey", label="offered")
    ax.set(xlabel="stock workers", ylabel="orders/s", title="scale: uniform at one rate",
           xticks=workers)
    return _finish(plt, fig, ax, path)


def _finish(plt: Any, fig: Any, ax: Any, path: Path) -> Path:
    """The common end of every plot: axes from zero, grid, legend, saved and closed."""
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
