"""Local PostgreSQL and RabbitMQ for `make run` and `make test`, with data under `.run/`.

Installs the Debian packages when missing, starts both servers as the project's own processes on
loopback (or reuses them if already running), creates one role and one database per service and
applies migrations. `run` then starts the whole system under honcho and, on Ctrl-C/SIGTERM,
stops everything it started."""

import argparse
import asyncio
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from shared.db import migrate
from shared.settings import Settings, get_settings, new_secret
from tooling.access import (
    Users,
    grant_vhost,
    migrator_dsn,
    provision_broker,
    provision_database,
    url_users,
)
from tooling.migrate import MIGRATIONS

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
PROMETHEUS_PORT_OFFSET = 10020  # RabbitMQ's Prometheus plugin: 15692 for AMQP on 5672


def ha_enabled() -> bool:
    """HA=1: `make run` and `make test` on the replicated servers of tooling/ha.py."""
    return os.environ.get("HA", "") not in ("", "0")


def say(message: str) -> None:
    print(f"[devenv] {message}", flush=True)


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, port)) == 0


def bindable(port: int) -> bool:
    """Nobody listens on 127.0.0.1:`port` (tooling picks ports with it; so do the test suites)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _is_local(url: str) -> bool:
    """Every host of `url` (libpq's multi-host form too) is this machine."""
    hosts = urlsplit(url).netloc.rpartition("@")[2].split(",")
    return all(h.rsplit(":", 1)[0].strip("[]") in ("127.0.0.1", "localhost", "::1") for h in hosts)


def _apt_install(*packages: str) -> None:
    say(f"installing {' '.join(packages)} from the OS packages")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env,
                   stdout=subprocess.DEVNULL)


@dataclass
class Postgres:
    run_dir: Path
    port: int

    @property
    def home(self) -> Path:
        return (self.run_dir / "pg").resolve()

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def password_file(self) -> Path:
        return self.run_dir / "pg-superuser-password"

    def admin_dsn(self, database: str = "postgres") -> str:
        password = self.password_file.read_text().strip()
        return f"postgresql://postgres:{password}@127.0.0.1:{self.port}/{database}"

    def bindir(self) -> Path:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            _apt_install("postgresql")
            found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        return Path(found[-1]).parent

    def _as_postgres(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)

    def ensure_running(self) -> bool:
        """True when this call started the server."""
        if _port_open(self.port):
            if not self.password_file.exists():
                raise SystemExit(f"port {self.port} is taken by a PostgreSQL this project did not start; "
                                 "stop it or point *_DATABASE_URL elsewhere")
            return False
        bindir = self.bindir()
        self.home.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.home, "postgres", "postgres")
            _ensure_traversable(self.home, "postgres")
        if not (self.data / "PG_VERSION").exists():
            self.password_file.write_text(new_secret() + "\n")
            self.password_file.chmod(0o600)
            pwfile = self.home / "pwfile"
            pwfile.write_text(self.password_file.read_text())
            if os.geteuid() == 0:
                shutil.chown(pwfile, "postgres")
            subprocess.run(self._as_postgres(
                str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
                "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
            ), check=True, stdout=subprocess.DEVNULL)
            pwfile.unlink()
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories='' "
                   "-c max_connections=400 -c shared_buffers=256MB")
        say(f"starting PostgreSQL on 127.0.0.1:{self.port} (data in {self.data})")
        subprocess.run(self._as_postgres(
            str(bindir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data),
            "-l", str(self.home / "server.log"), "-o", options,
        ), check=True, stdout=subprocess.DEVNULL)
        return True

    def stop(self) -> None:
        say("stopping PostgreSQL")
        subprocess.run(self._as_postgres(str(self.bindir() / "pg_ctl"), "stop", "-m", "fast", "-D",
                                         str(self.data)), check=False, stdout=subprocess.DEVNULL)

    async def ensure_database(self, dsn: str, *, fresh: bool = False) -> None:
        """The roles and database of `dsn`: owned by a migrator, reached by the runtime role of
        `dsn` only, without DDL (tooling/access.py)."""
        await provision_database(self.admin_dsn(), dsn, self.run_dir, fresh=fresh)

    def migrator_dsn(self, dsn: str) -> str:
        """`dsn` as the migrator of its database: for migrations and tests that tamper."""
        return migrator_dsn(dsn, self.run_dir)


def _ensure_traversable(path: Path, user: str) -> None:
    """PostgreSQL runs as `postgres`: every folder above its data must let it pass."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise SystemExit(f"{parent} is not traversable by the {user} user; "
                             f"chmod o+x it or set RUN_DIR to a path under /tmp")


# RabbitMQ before 3.11.x/3.12.x (Debian 12 ships 3.10) boots a whole Erlang VM every 60 s to make
# sure epmd runs (rabbit_epmd_monitor; rabbitmq-server#10457 made that a cheap look): ~0.17 s of
# CPU a minute, about what the rest of the idle broker costs. The monitor only re-registers the
# node if epmd dies, and nothing here stops epmd; the broker registered itself as it booted.
STOP_EPMD_MONITOR = "supervisor:terminate_child(rabbit_sup, rabbit_epmd_monitor_sup)."


@dataclass
class Rabbit:
    run_dir: Path
    port: int
    node: str = ""  # default: one node name per port, so several local brokers can coexist
    # The users services, tools and tests connect as, granted on every vhost (tooling/access.py)
    users: Users = field(default_factory=lambda: {"guest": ("guest", None)})

    def __post_init__(self) -> None:
        self.node = self.node or f"inventory-{self.port}@localhost"

    @property
    def home(self) -> Path:
        return (self.run_dir / "rabbitmq").resolve()

    def env(self) -> dict[str, str]:
        home = self.home
        return {
            **os.environ,
            "HOME": str(home),  # the Erlang cookie lives here, shared by server and rabbitmqctl
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(home / "log"),
            "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(home / "rabbitmq.pid"),
        }

    @property
    def dist_port(self) -> int:
        """Erlang distribution port, derived from the AMQP port (25672 for 5672)."""
        return self.port + 20000 if self.port < 45000 else self.port - 20000

    @property
    def prometheus_port(self) -> int:
        up = self.port + PROMETHEUS_PORT_OFFSET
        return up if up <= 65535 else self.port - PROMETHEUS_PORT_OFFSET

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args], env=self.env(),
                              check=check, capture_output=True, text=True)

    def config(self, prometheus: bool) -> str:
        """The node's rabbitmq.conf."""
        if not prometheus:
            return "loopback_users = none\n"
        return ("loopback_users = none\n"
                f"prometheus.tcp.ip = 127.0.0.1\nprometheus.tcp.port = {self.prometheus_port}\n"
                # The plugin brings the management agent, whose statistics collectors serve only
                # the management UI (not run here) and wake the idle broker every few seconds;
                # the Prometheus endpoint reads the broker's core metrics, not theirs.
                "management_agent.disable_metrics_collector = true\n")

    def ensure_running(self) -> bool:
        if not (RABBIT_BIN / "rabbitmq-server").exists():
            _apt_install("rabbitmq-server")
        if _port_open(self.port):
            return False
        home = self.home
        (home / "log").mkdir(parents=True, exist_ok=True)
        # RabbitMQ's own Prometheus endpoint (queue depths, connections, node health), on a port
        # derived from AMQP's (15692 for 5672) so several local brokers never collide.
        # A port someone else holds would stop the node from booting: then it runs without.
        plugin = bindable(self.prometheus_port)
        (home / "enabled_plugins").write_text("[rabbitmq_prometheus].\n" if plugin else "[].\n")
        (home / "rabbitmq.conf").write_text(self.config(prometheus=plugin))
        if not plugin:
            say(f"port {self.prometheus_port} is taken: RabbitMQ's Prometheus plugin stays off")
        say(f"starting RabbitMQ on 127.0.0.1:{self.port} (data in {home})")
        with open(home / "server.log", "ab") as log:
            subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env(), stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.ctl("await_startup", "--timeout", "5", check=False).returncode == 0 and _port_open(self.port):
                self.ctl("eval", STOP_EPMD_MONITOR, check=False)
                return True
            time.sleep(0.5)
        raise SystemExit(f"RabbitMQ did not start; see {home / 'server.log'}")

    def stop(self) -> None:
        say("stopping RabbitMQ")
        self.ctl("stop", check=False)

    def ensure_vhost(self, vhost: str, user: str | None = None) -> None:
        """The vhost, with `user` (full rights) or else every user of `users` granted on it."""
        self.ctl("add_vhost", vhost, check=False)
        grant_vhost(self, vhost, {user: ("", None)} if user else self.users)

    def delete_vhost(self, vhost: str) -> None:
        self.ctl("delete_vhost", vhost, check=False)


def local_servers(settings: Settings) -> tuple[Postgres | None, Rabbit | None]:
    pg_url = settings.orders_database_url
    pg = Postgres(settings.run_dir, urlsplit(pg_url).port or 5432) if _is_local(pg_url) else None
    rabbit = (Rabbit(settings.run_dir, urlsplit(settings.amqp_url).port or 5672,
                     users=url_users(settings))
              if _is_local(settings.amqp_url) else None)
    return pg, rabbit


def up(settings: Settings) -> list[Postgres | Rabbit]:
    """Provisions everything; returns the servers this call started."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    pg, rabbit = local_servers(settings)
    started: list[Postgres | Rabbit] = []
    if pg is not None and pg.ensure_running():
        started.append(pg)
    if rabbit is not None and rabbit.ensure_running():
        started.append(rabbit)
    if rabbit is not None:
        provision_broker(rabbit, settings)
    provision(settings, pg)
    return started


def provision(settings: Settings, pg: Postgres | None) -> None:
    """Roles, databases (on `pg` when the URLs point at it) and migrations; the admin token."""
    async def databases() -> None:
        for url, package in ((settings.orders_database_url, "orders"), (settings.stock_database_url, "stock")):
            if pg is not None and _is_local(url):
                await pg.ensure_database(url)
                url = pg.migrator_dsn(url)
            applied = await migrate(url, MIGRATIONS[package])
            if applied:
                say(f"{package}: applied {', '.join(applied)}")

    asyncio.run(databases())
    settings.resolved_admin_token()


def wait_ready(url: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def run(settings: Settings, start: "Callable[[Settings], Sequence[object]]" = up) -> int:
    """`make run`: `start` provisions (and returns the servers it started, stopped at the end)."""
    started = start(settings)
    procfile = Path(__file__).resolve().parent.parent / "Procfile"
    honcho = Path(sys.executable).parent / "honcho"
    supervisor = subprocess.Popen(
        [str(honcho), "-f", str(procfile), "-d", os.getcwd(), "start",
         "-c", f"stock-worker={settings.stock_workers}"],
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"},
    )
    stop = {"requested": False}

    def on_signal(*_: object) -> None:
        stop["requested"] = True
        if supervisor.poll() is None:
            supervisor.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    gateway = f"http://127.0.0.1:{settings.gateway_port}"
    if wait_ready(gateway + "/health/ready") and not stop["requested"]:
        token = settings.resolved_admin_token()
        say(f"ready: {gateway}  (docs: {gateway}/docs)")
        last = settings.stock_worker_port + settings.stock_workers - 1
        say(f"orders :{settings.orders_port}, stock API :{settings.stock_port}, "
            f"{settings.stock_workers} stock worker(s) (health and metrics on "
            f":{settings.stock_worker_port}-{last})")
        say(f"admin token: {token}  (also in {settings.run_dir / 'admin-token'})")
        say("Ctrl-C stops everything")
    code = supervisor.wait()
    for server in reversed(started):
        server.stop()  # type: ignore[attr-defined]
    return 0 if stop["requested"] else code  # a stop asked for is a clean exit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["up", "run", "down"])
    args = parser.parse_args()
    settings = get_settings()
    if ha_enabled():  # HA=1: the replicated servers of tooling/ha.py instead
        from tooling import ha
        sys.exit(ha.main(args.command, settings))
    if args.command == "up":
        up(settings)
    elif args.command == "run":
        sys.exit(run(settings))
    else:
        pg, rabbit = local_servers(settings)
        for server in (rabbit, pg):
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
