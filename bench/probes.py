"""What each process and each database did while a run lasted, from /proc and PostgreSQL's
statistics: CPU, wake-ups (voluntary context switches: a process that blocks and is woken again),
read/write system calls, transactions, rows written, outbox messages, WAL flushes.

The machine is shared: only the system's own processes are counted — the services we started,
OUR PostgreSQL (the postmaster and its children) and OUR RabbitMQ (beam.smp and its children),
this load generator — never another checkout's servers of the same name. `machine` is the whole
machine's busy time, so `machine − ours` is what everyone else used meanwhile: the noise."""

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import asyncpg

TICK = os.sysconf("SC_CLK_TCK")
CLIENT = "bench-client"
SERVER_NAMES = {"postgres": "postgresql", "beam.smp": "rabbitmq"}  # fallback when no pid is known
COUNTERS = ("cpu_s", "wakeups", "preempted", "syscalls_read", "syscalls_write")


def server_pids(pg: Any, rabbit: Any) -> dict[str, int]:
    """The root pid of our PostgreSQL (postmaster.pid) and RabbitMQ (its pid file), when known."""
    found: dict[str, int] = {}
    for label, path in (("postgresql", pg and pg.data / "postmaster.pid"),
                        ("rabbitmq", rabbit and rabbit.home / "rabbitmq.pid")):
        with suppress(OSError, ValueError, TypeError):
            found[label] = int(path.read_text().split()[0])
    return found


def _stat(pid: str) -> tuple[str, int, float, float] | None:
    """(command name, parent pid, CPU seconds, CPU seconds of its children that ended and were
    waited for) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            head, _, tail = stat.read().rpartition(")")
    except OSError:
        return None
    fields = tail.split()
    return (head.partition("(")[2], int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK,
            (int(fields[13]) + int(fields[14])) / TICK)


def _extra(pid: int) -> dict[str, float]:
    """Context switches (summed over the threads: RabbitMQ has many) and system calls of one
    process; zeros where unreadable."""
    out = dict.fromkeys(COUNTERS[1:], 0.0)
    with suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with suppress(OSError), open(f"/proc/{pid}/task/{task}/status") as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches"):
                        out["wakeups"] += float(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        out["preempted"] += float(line.split()[1])
        with open(f"/proc/{pid}/io") as io:
            for line in io:
                key, _, value = line.partition(":")
                if key in ("syscr", "syscw"):
                    out["syscalls_read" if key == "syscr" else "syscalls_write"] = float(value)
    return out


def snapshot(pids: dict[str, int]) -> dict[str, dict[str, float]]:
    """Counters so far per part: each of `pids` by name — `postgresql` and `rabbitmq` (see
    `server_pids`) summed with their children —, this process as `bench-client`, and `machine`
    (busy time only). Without server pids, every process named like a server is counted."""
    servers = {name: pid for name, pid in pids.items() if name in SERVER_NAMES.values()}
    roots = {pid: label for label, pid in servers.items()}
    ours = {pid: name for name, pid in pids.items() if name not in servers} | {os.getpid(): CLIENT}
    parts: dict[str, dict[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (stat := _stat(entry)) is None:
            continue
        command, ppid, cpu, ended = stat
        pid = int(entry)
        name = ours.get(pid) or roots.get(pid) or roots.get(ppid)
        if name is None and not servers:
            name = SERVER_NAMES.get(command)
        if name is None:
            continue
        part = parts.setdefault(name, dict.fromkeys(COUNTERS, 0.0))
        # A server's helpers that live less than a run (PostgreSQL's autovacuum workers, the
        # Erlang VM RabbitMQ 3.10 boots every minute to look at epmd) are never seen alive here:
        # their CPU is in the parent that waited for them. Not for our services: they are this
        # process's children, counted by pid while they live.
        part["cpu_s"] += cpu + (ended if name in servers else 0.0)
        for key, value in _extra(pid).items():
            part[key] += value
    with open("/proc/stat") as stat:
        cpu = [int(v) for v in stat.readline().split()[1:]]
    parts["machine"] = {"cpu_s": (sum(cpu) - cpu[3] - cpu[4]) / TICK}  # all but idle and iowait
    return parts


def difference(after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """after − before per part and counter, for the parts present in both."""
    return {name: {k: round(v - before[name].get(k, 0.0), 3) for k, v in counters.items()}
            for name, counters in after.items() if name in before}


@dataclass
class Usage:
    """What `process_usage` fills in when its block ends."""

    wall_s: float = 0.0
    parts: dict[str, dict[str, float]] = field(default_factory=dict)

    def cpu_seconds(self) -> dict[str, float]:
        return {name: round(c["cpu_s"], 3) for name, c in self.parts.items()}

    def cores(self, digits: int = 3) -> dict[str, float]:
        return {name: round(c["cpu_s"] / max(self.wall_s, 1e-6), digits) for name, c in self.parts.items()}


@asynccontextmanager
async def process_usage(pids: dict[str, int]) -> AsyncIterator[Usage]:
    usage = Usage()
    before, started = snapshot(pids), time.monotonic()
    try:
        yield usage
    finally:
        usage.parts = difference(snapshot(pids), before)
        usage.wall_s = round(time.monotonic() - started, 3)


# ----- PostgreSQL's own counters -----------------------------------------------------------------
DATABASE_STATS = """
SELECT datname, xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted
FROM pg_stat_database WHERE datname = ANY($1::text[])
"""
SEQUENCE_VALUE = "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {}"
# Outbox rows written = messages published: the id sequence is exact at once (statistics lag).
OUTBOX_STATS = "SELECT coalesce(sum(n_tup_ins), 0) FROM pg_stat_user_tables WHERE relname = 'outbox'"
WAL_STATS = "SELECT wal_records, wal_write, wal_sync FROM pg_stat_wal"
STATS_SETTLE_S = 1.2  # a busy backend reports its counters at most once a second


async def database_counters(admin_dsn: str, dsns: list[str]) -> dict[str, float]:
    """Transactions and rows written per database, outbox rows (= messages published), WAL
    records and flushes (cluster-wide), and assigned transaction ids (write transactions: exact,
    where the statistics lag by up to a second). Needs the superuser."""
    names = [urlsplit(dsn).path.lstrip("/") for dsn in dsns]
    out: dict[str, float] = {}
    conn = await asyncpg.connect(admin_dsn)
    try:
        for row in await conn.fetch(DATABASE_STATS, names):
            db = row["datname"].split("_")[0]
            out[f"{db} transactions"] = row["xact_commit"] + row["xact_rollback"]
            out[f"{db} rows written"] = row["tup_inserted"] + row["tup_updated"] + row["tup_deleted"]
        wal = await conn.fetchrow(WAL_STATS)
        out["WAL flushes (cluster)"], out["WAL records (cluster)"] = wal["wal_sync"], wal["wal_records"]
        out["write transactions (cluster xids)"] = await conn.fetchval(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
        for name in names:
            db = await asyncpg.connect(urlsplit(admin_dsn)._replace(path=f"/{name}").geturl())
            try:
                sequence = await db.fetchval("SELECT pg_get_serial_sequence('outbox', 'id')")
                out[f"{name.split('_')[0]} outbox messages"] = await db.fetchval(
                    SEQUENCE_VALUE.format(sequence) if sequence else OUTBOX_STATS)
            finally:
                await db.close()
    finally:
        await conn.close()
    return {k: float(v) for k, v in out.items()}


@asynccontextmanager
async def database_usage(admin_dsn: str | None, dsns: list[str]) -> AsyncIterator[dict[str, float]]:
    """The change of `database_counters` over the block (empty without the superuser DSN)."""
    delta: dict[str, float] = {}
    if admin_dsn is None:
        yield delta
        return
    await asyncio.sleep(STATS_SETTLE_S)
    before = await database_counters(admin_dsn, dsns)
    try:
        yield delta
    finally:
        await asyncio.sleep(STATS_SETTLE_S)
        after = await database_counters(admin_dsn, dsns)
        delta.update({k: after[k] - before[k] for k in after if k in before})
