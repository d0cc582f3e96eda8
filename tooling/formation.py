"""A pg_auto_failover formation on loopback for `HA=1`: a monitor and two PostgreSQL 15 nodes, one
primary and one synchronous standby that the monitor promotes when the primary dies.

Every piece is a `pg_autoctl` supervisor (keeper + postmaster) started as the `postgres` user with
data under RUN_DIR/ha/pg. Every connection, also between the servers (keepers to the monitor,
monitor health checks, replication), authenticates with a password (scram-sha-256): the
superuser's in RUN_DIR/pg-superuser-password, pg_auto_failover's own roles share one generated
secret, and both sit in a pgpass file only the `postgres` user reads, which libpq in every
pg_autoctl and postmaster finds through PGPASSFILE."""

import asyncio
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from shared.settings import new_secret
from tooling.devenv import Postgres, _apt_install, _ensure_traversable, _port_open, say

PACKAGES = ("postgresql-15", "postgresql-15-auto-failover", "pg-auto-failover-cli")
BINDIR = Path("/usr/lib/postgresql/15/bin")
INTERNAL_ROLES = ("autoctl_node", "pgautofailover_monitor", "pgautofailover_replicator")
CONF = """
listen_addresses = '127.0.0.1'
unix_socket_directories = '{sock}'
max_connections = 300
shared_buffers = 128MB
# A commit returns once the standby has applied it, not only flushed it: whoever connects next
# through the multi-host URL sees it on either node. (With `on`, a database just created on the
# primary was not there yet on the standby, and asyncpg, which tries the hosts in order, gives
# up at the first one's "database does not exist" instead of trying the next, as libpq would.)
synchronous_commit = remote_apply
# pg_autoctl keeps 8 GB of WAL for a standby that falls behind; RUN_DIR is a developer's disk.
wal_keep_size = '512MB'
"""
# The monitor's defaults take ~50 s from a dead primary to a writable standby (10 s to call a
# node unhealthy, 10 s more, then 30 s waiting for the dead primary to demote itself). A node
# on this machine that misses 1 s checks for 5 s is dead, and a dead primary is given 10 s to
# demote: it cannot acknowledge a commit meanwhile anyway (synchronous replication to a
# standby that stopped replicating from it).
MONITOR_CONF = """
pgautofailover.health_check_period = 1000
pgautofailover.health_check_timeout = 2000
pgautofailover.health_check_max_retries = 2
pgautofailover.health_check_retry_delay = 1000
pgautofailover.node_considered_unhealthy_timeout = 5000
pgautofailover.primary_demote_timeout = '10s'
"""


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Member:
    """The monitor or one node: a data directory and a pg_autoctl supervisor."""
    name: str
    port: int
    home: Path

    @property
    def data(self) -> Path:
        return self.home / self.name

    @property
    def pid_file(self) -> Path:
        return self.home / f"{self.name}.supervisor.pid"

    def supervisor_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None


class Formation(Postgres):
    """Quacks like devenv.Postgres (admin_dsn, ensure_database, ensure_running, stop), so the
    test Stack and `make run` provision on it unchanged; `dsn` gives libpq multi-host URLs."""

    def __init__(self, run_dir: Path, monitor_port: int, node_ports: tuple[int, int]) -> None:
        super().__init__(run_dir, node_ports[0])
        self.pg_home = (run_dir / "ha" / "pg").resolve()
        self.monitor = Member("monitor", monitor_port, self.pg_home)
        self.nodes = [Member(f"node{i + 1}", port, self.pg_home) for i, port in enumerate(node_ports)]

    # ----- addresses ---------------------------------------------------------------------------
    def hosts(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def dsn(self, user: str, password: str, database: str) -> str:
        """The URL services get: libpq tries both nodes and keeps the one that takes writes.
        The parts as they stand in a URL (percent-encoded where needed)."""
        return f"postgresql://{user}:{password}@{self.hosts()}/{database}?target_session_attrs=read-write"

    def admin_dsn(self, database: str = "postgres") -> str:
        return self.dsn("postgres", self.password_file.read_text().strip(), database)

    def monitor_dsn(self) -> str:
        password = self.password_file.read_text().strip()
        return f"postgresql://postgres:{password}@127.0.0.1:{self.monitor.port}/pg_auto_failover"

    # ----- processes ---------------------------------------------------------------------------
    @property
    def pgpass(self) -> Path:
        return self.pg_home / "pgpass"

    def _env(self) -> dict[str, str]:
        xdg = self.pg_home / "xdg"
        return {
            "PATH": f"{BINDIR}:/usr/local/bin:/usr/bin:/bin", "HOME": str(self.pg_home),
            "LANG": "C.UTF-8", "PGPASSFILE": str(self.pgpass), "PGHOST": "127.0.0.1",
            "XDG_CONFIG_HOME": str(xdg / "config"), "XDG_DATA_HOME": str(xdg / "data"),
            "XDG_RUNTIME_DIR": str(xdg / "run"), "PG_CONFIG": str(BINDIR / "pg_config"),
        }

    def _as_postgres(self, *args: str) -> list[str]:
        if os.geteuid() != 0:
            return list(args)
        return ["runuser", "-u", "postgres", "--", "env", *(f"{k}={v}" for k, v in self._env().items()), *args]

    def _autoctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = None if os.geteuid() == 0 else {**os.environ, **self._env()}
        return subprocess.run(self._as_postgres("pg_autoctl", *args), check=check, env=env,
                              capture_output=True, text=True)

    def _spawn(self, member: Member, *args: str) -> None:
        log = open(self.pg_home / f"{member.name}.log", "ab")  # noqa: SIM115 - the child owns it
        env = None if os.geteuid() == 0 else {**os.environ, **self._env()}
        proc = subprocess.Popen(self._as_postgres("pg_autoctl", *args), env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        member.pid_file.write_text(str(proc.pid))

    def _prepare(self) -> None:
        if not (BINDIR / "initdb").exists() or shutil.which("pg_autoctl") is None:
            _apt_install(*PACKAGES)
        self.pg_home.mkdir(parents=True, exist_ok=True)
        (self.pg_home / "sock").mkdir(mode=0o700, exist_ok=True)
        if not self.password_file.exists():
            self.password_file.write_text(new_secret() + "\n")
            self.password_file.chmod(0o600)
        internal = self.pg_home / "internal-password"
        if not internal.exists():
            internal.write_text(new_secret() + "\n")
            internal.chmod(0o600)
        lines = [f"*:*:*:postgres:{self.password_file.read_text().strip()}"]
        lines += [f"*:*:*:{role}:{internal.read_text().strip()}" for role in INTERNAL_ROLES]
        self.pgpass.write_text("\n".join(lines) + "\n")
        self.pgpass.chmod(0o600)
        if os.geteuid() == 0:
            for path in (self.pg_home, self.pg_home / "sock", self.pgpass, internal):
                shutil.chown(path, "postgres", "postgres")
            _ensure_traversable(self.pg_home, "postgres")

    def _initdb(self, member: Member) -> None:
        """Our own initdb (pg_autoctl's trusts every local connection), then pg_autoctl adopts it."""
        if (member.data / "PG_VERSION").exists():
            return
        pwfile = self.pg_home / "pwfile"
        pwfile.write_text(self.password_file.read_text())
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres")
        subprocess.run(self._as_postgres(
            str(BINDIR / "initdb"), "-D", str(member.data), "-U", "postgres", "-E", "UTF8",
            "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"),
            check=True, stdout=subprocess.DEVNULL)
        pwfile.unlink()
        with open(member.data / "postgresql.conf", "a") as conf:
            conf.write(CONF.format(sock=self.pg_home / "sock"))
            if member is self.monitor:
                conf.write(MONITOR_CONF)

    def _monitor_uri(self) -> str:
        return f"postgres://autoctl_node@127.0.0.1:{self.monitor.port}/pg_auto_failover?sslmode=disable"

    def start_member(self, member: Member) -> None:
        """Starts the member's supervisor (creating the member the first time)."""
        if member.supervisor_pid() is not None:
            return
        configured = (self.pg_home / "xdg" / "config" / "pg_autoctl" / str(member.data).lstrip("/")
                      / "pg_autoctl.cfg").exists()
        if configured:
            self._spawn(member, "run", "--pgdata", str(member.data))
        elif member is self.monitor:
            self._initdb(member)
            self._autoctl("create", "monitor", "--pgdata", str(member.data), "--pgport", str(member.port),
                          "--hostname", "127.0.0.1", "--auth", "scram-sha-256", "--no-ssl",
                          "--pgctl", str(BINDIR / "pg_ctl"))
            # `create monitor` has no --listen and would listen on every interface.
            self._autoctl("config", "set", "--pgdata", str(member.data),
                          "postgresql.listen_addresses", "127.0.0.1")
            self._spawn(member, "run", "--pgdata", str(member.data))
        else:
            if member is self.nodes[0]:
                self._initdb(member)
            self._spawn(member, "create", "postgres", "--pgdata", str(member.data), "--pgport",
                        str(member.port), "--pghost", "127.0.0.1", "--listen", "127.0.0.1",
                        "--hostname", "127.0.0.1", "--name", member.name, "--monitor",
                        self._monitor_uri(), "--auth", "scram-sha-256", "--no-ssl",
                        "--pgctl", str(BINDIR / "pg_ctl"), "--run")

    def kill_member(self, member: Member, sig: int = signal.SIGKILL) -> None:
        """The whole member at once: its supervisor's session (keeper, postmaster, backends)."""
        pid = member.supervisor_pid()
        postmaster = member.postmaster_pid()
        if pid is not None:
            os.killpg(pid, sig)
        if postmaster is not None and sig == signal.SIGKILL:
            os.kill(postmaster, sig)

    # ----- state -------------------------------------------------------------------------------
    async def states(self) -> dict[str, tuple[str, str]]:
        """node name -> (reported state, goal state), as the monitor sees them."""
        conn = await asyncpg.connect(self.monitor_dsn(), timeout=5)
        try:
            rows = await conn.fetch("SELECT nodename, reportedstate::text, goalstate::text FROM pgautofailover.node")
        finally:
            await conn.close()
        return {r["nodename"]: (r["reportedstate"], r["goalstate"]) for r in rows}

    async def primary(self) -> Member | None:
        """The node the monitor says takes writes (None during a switch)."""
        conn = await asyncpg.connect(self.monitor_dsn(), timeout=5)
        try:
            name = await conn.fetchval("SELECT primary_name FROM pgautofailover.get_primary()")
        except asyncpg.PostgresError:
            name = None
        finally:
            await conn.close()
        return next((n for n in self.nodes if n.name == name), None)

    async def wait_healthy(self, timeout: float = 180) -> None:
        """Until one node is primary and the other its synchronous standby."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                last = await self.states()
                if sorted(s for s, goal in last.values() if s == goal) == ["primary", "secondary"]:
                    return
            except (OSError, asyncpg.PostgresError) as exc:
                last = exc
            await asyncio.sleep(0.5)
        raise SystemExit(f"the PostgreSQL formation did not become healthy: {last}; logs in {self.pg_home}")

    async def _set_internal_passwords(self, dsn: str, roles: tuple[str, ...]) -> None:
        secret = (self.pg_home / "internal-password").read_text().strip()
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            for role in roles:
                if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                    await conn.execute(f"ALTER ROLE {role} PASSWORD '{secret}'")
        finally:
            await conn.close()

    async def _wait_for(self, dsn: str, query: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = await asyncpg.connect(dsn, timeout=3)
                try:
                    if await conn.fetchval(query):
                        return
                finally:
                    await conn.close()
            except (OSError, asyncpg.PostgresError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not come up; logs in {self.pg_home}")
            await asyncio.sleep(0.3)

    # ----- lifecycle ---------------------------------------------------------------------------
    def ensure_running(self) -> bool:
        """True when this call started something."""
        members = [self.monitor, *self.nodes]
        if all(m.supervisor_pid() is not None for m in members):
            return False
        for member in members:
            if member.supervisor_pid() is None and _port_open(member.port):
                raise SystemExit(f"port {member.port} is taken by a server this project did not start")
        self._prepare()
        say(f"starting the pg_auto_failover formation: monitor :{self.monitor.port}, nodes "
            f"{', '.join(str(n.port) for n in self.nodes)} (data in {self.pg_home})")
        asyncio.run(self._start_all())
        return True

    async def _start_all(self) -> None:
        mon_dsn = self.monitor_dsn().replace("/pg_auto_failover", "/postgres")
        self.start_member(self.monitor)
        await self._wait_for(self.monitor_dsn(), "SELECT count(*) >= 0 FROM pgautofailover.formation",
                             120, "the monitor")
        await self._set_internal_passwords(mon_dsn, ("autoctl_node",))
        first, second = self.nodes
        fresh = not (second.data / "PG_VERSION").exists()
        self.start_member(first)
        if fresh:  # the standby copies the primary with the replication role's password
            node_dsn = f"postgresql://postgres:{self.password_file.read_text().strip()}@127.0.0.1:{first.port}/postgres"
            await self._wait_for(node_dsn, "SELECT 1 FROM pg_roles WHERE rolname = 'pgautofailover_replicator'",
                                 120, first.name)
            await self._set_internal_passwords(node_dsn, INTERNAL_ROLES[1:])
        self.start_member(second)
        await self.wait_healthy()

    def stop(self) -> None:
        say("stopping the pg_auto_failover formation")
        for member in [*self.nodes, self.monitor]:
            pid = member.supervisor_pid()
            if pid is not None:
                os.kill(pid, signal.SIGTERM)  # pg_autoctl stops its postmaster (fast) and itself
        for member in [*self.nodes, self.monitor]:
            pid = member.supervisor_pid()
            deadline = time.monotonic() + 60
            while pid is not None and pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if pid is not None and pid_alive(pid):
                self.kill_member(member)
            member.pid_file.unlink(missing_ok=True)
