"""The report's part for the closed loops and the idle stack: tables, the ratios against pgbench
and the curve of CPU per order against load (bench/closed.py measures them)."""

from pathlib import Path
from typing import Any

CLOSED = ("idle", "closed", "closed-flash")
PARTS = ("postgresql", "rabbitmq", "orders", "stock workers", "stock-api", "gateway", "bench-client")


def per_order(point: dict[str, Any]) -> dict[str, float]:
    """CPU ms per order by part (workers summed), `ours` (every part, the load generator
    included) and `others` (the rest of the machine meanwhile: the noise)."""
    seconds = dict(point.get("cpu_seconds") or {})
    orders = point.get("orders_in_db") or 0
    if not seconds or not orders:
        return {}
    machine = seconds.pop("machine", 0.0)
    parts: dict[str, float] = {}
    for name, value in seconds.items():
        key = "stock workers" if name.startswith("worker-") else name
        parts[key] = parts.get(key, 0.0) + value
    ours = sum(parts.values())
    out = {k: round(1000 * v / orders, 2) for k, v in parts.items()}
    out["ours"] = round(1000 * ours / orders, 2)
    out["others"] = round(1000 * max(machine - ours, 0.0) / orders, 2)
    return out


def counters_per_order(point: dict[str, Any]) -> dict[str, float]:
    """Transactions, WAL flushes and messages per order (PostgreSQL's counters), and wake-ups
    and write system calls per order of each process."""
    orders = point.get("orders_in_db") or 0
    if not orders:
        return {}
    out = {k: round(v / orders, 2) for k, v in (point.get("database_counters") or {}).items()}
    for name, c in sorted((point.get("process_counters") or {}).items()):
        if name != "machine":
            out[f"{name} wake-ups"] = round(c.get("wakeups", 0) / orders, 1)
            out[f"{name} write syscalls"] = round(c.get("syscalls_write", 0) / orders, 1)
    return out


def throughput(point: dict[str, Any]) -> float | None:
    """Closed loops: decisions seen by the clients per second; open loop: settled per second."""
    return point.get("orders_per_s") if point.get("loop") == "closed" else point.get("settled_per_s")


def closed_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """64 (the largest C) client loops ÷ pgbench uniform, closed flash sale ÷ pgbench hot, and
    the CPU of an order at one client ÷ its cheapest cost in the run (saturation)."""
    ceiling = results.get("ceiling") or {}
    scenarios = results.get("scenarios", {})
    ratios: dict[str, Any] = {}
    closed = [p for p in scenarios.get("closed", {}).get("points", []) if p.get("orders_per_s")]
    uniform_tps = (ceiling.get("uniform") or {}).get("tps")
    if closed and uniform_tps:
        top = max(closed, key=lambda p: p["clients"])
        ratios[f"closed_{top['clients']}_clients_vs_pgbench_uniform"] = {
            "settled_per_s": top["orders_per_s"], "ceiling_tps": uniform_tps,
            "ratio": round(top["orders_per_s"] / uniform_tps, 3)}
    flash = scenarios.get("closed-flash", {}).get("points", [])
    hot_tps = (ceiling.get("hot") or {}).get("tps")
    if flash and flash[0].get("orders_per_s") and hot_tps:
        ratios["closed_flash_sale_vs_pgbench_hot"] = {
            "settled_per_s": flash[0]["orders_per_s"], "ceiling_tps": hot_tps,
            "ratio": round(flash[0]["orders_per_s"] / hot_tps, 3)}
    costs = [per_order(p).get("ours") for body in scenarios.values() for p in body.get("points", [])]
    cheapest = min((c for c in costs if c), default=None)
    one = next((per_order(p).get("ours") for p in closed if p["clients"] == 1), None)
    if one and cheapest:
        ratios["cpu_per_order_one_client_vs_cheapest"] = {
            "one_client_ms": one, "cheapest_ms": cheapest, "ratio": round(one / cheapest, 2)}
    return ratios


def _n(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _lat(summary: dict[str, Any] | None) -> str:
    if not summary or not summary.get("count"):
        return "–"
    return " / ".join(_n(summary[k], 0) for k in ("p50", "p95", "p99", "max"))


def _ok(point: dict[str, Any]) -> str:
    inv = point.get("invariants", {})
    return "ok" if inv.get("ok") else "**FAILED** " + ", ".join(
        k for k, v in inv.items() if v is False and k != "ok")


def render(results: dict[str, Any]) -> list[str]:
    scenarios = results.get("scenarios", {})
    lines: list[str] = []
    for name in ("closed", "closed-flash"):
        body = scenarios.get(name)
        if not body:
            continue
        lines += [f"## {name} (closed loop: POST, then `GET /orders/{{id}}?wait=10` until decided)", ""]
        if body.get("error"):
            lines += [f"**Did not complete:** `{body['error']}`", ""]
        points = body.get("points", [])
        if not points:
            continue
        header = ("| client loops | orders | orders/s | client ms p50 / p95 / p99 / max | CPU ms per "
                  "order, ours (others) | " + " | ".join(PARTS) + " | errors | invariants |")
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        for p in points:
            cost = per_order(p)
            cells = [_n(p["clients"]), _n(p.get("orders_in_db")), _n(p.get("orders_per_s")),
                     _lat(p.get("client_latency_ms", {}).get("decision")),
                     f"{_n(cost.get('ours'), 2)} ({_n(cost.get('others'), 2)})",
                     *(_n(cost.get(part), 2) for part in PARTS), _n(p.get("error_count", 0)), _ok(p)]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"- {p['clients']} loops, per order: " + ", ".join(
            f"{k} {v}" for k, v in counters_per_order(p).items()) + f"; statuses {p.get('statuses')}"
            + (f"; errors {p['errors']}" if p.get("errors") else "") for p in points] + [""]
        lines += [line for p in points for line in _profile_lines(p)]
    idle = scenarios.get("idle", {}).get("points", [])
    if idle:
        cores = idle[0]["cpu_share_of_one_core"]
        lines += ["## idle (no load)", "",
                  f"The whole stack used **{100 * idle[0]['stack_share_of_one_core']:.2f}% of one core** over "
                  f"{idle[0]['seconds']:.0f} s: " + ", ".join(
                      f"{k} {100 * v:.2f}%" for k, v in sorted(cores.items(), key=lambda kv: -kv[1])
                      if k not in ("machine", "bench-client")) +
                  f" (whole machine meanwhile {100 * cores.get('machine', 0):.0f}%).", ""]
    if results.get("scenarios"):
        lines += ["![CPU per order against load](cpu_per_order.png)", ""]
    return lines


def _profile_lines(point: dict[str, Any]) -> list[str]:
    """py-spy's shares per service (on-CPU samples), when the run was profiled."""
    profile = point.get("profile") or {}
    def pct(shares: dict[str, float], n: int = 6) -> str:
        return ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(shares.items())[:n])

    lines = [f"- profile, {point['clients']} loops, {name} ({s['samples']} samples): system calls "
             f"{100 * s['syscall_share']:.0f}%; where: {pct(s['where'])}; via: {pct(s['via'])}; "
             f"writes via: {pct(s['writes_via'], 4)}"
             for name, s in sorted(profile.items()) if s.get("samples")]
    return lines + [""] if lines else []


def plot_cpu_curve(plt: Any, results: dict[str, Any], path: Path) -> Path | None:
    """CPU ms per order (our processes) against orders/s: closed loops (C labelled), open loop."""
    scenarios = results.get("scenarios", {})
    series = {"closed loops": scenarios.get("closed", {}).get("points", []),
              "closed flash sale": scenarios.get("closed-flash", {}).get("points", []),
              "open loop, uniform": scenarios.get("uniform", {}).get("points", []),
              "open loop, flash sale": scenarios.get("flash-sale", {}).get("points", [])}
    curves = {label: sorted((throughput(p), per_order(p)["ours"]) for p in points
                            if throughput(p) and per_order(p).get("ours"))
              for label, points in series.items()}
    if not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for (label, xy), marker in zip(curves.items(), ("o-", "D", "s--", "^"), strict=True):
        if not xy:
            continue
        points = series[label]
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker, label=label)
        if label == "closed loops":
            for p in points:
                if throughput(p) and per_order(p).get("ours"):
                    ax.annotate(f"C={p['clients']}", (throughput(p), per_order(p)["ours"]),
                                textcoords="offset points", xytext=(5, 5), fontsize="small")
    ax.set(xlabel="orders/s (closed: decided seen by clients; open: settled)",
           ylabel="CPU ms per order (all our processes)",
           title="cost of an order against load (lower and flatter is better)")
    xs = [x for xy in curves.values() for x, _ in xy]
    if max(xs) > 10 * min(xs):  # 1 client loop to 1,000 orders/s open loop: a log axis
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:,.0f}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize="x-small")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
