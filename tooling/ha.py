"""`HA=1 make run` / `HA=1 make test`: the system on replicated infrastructure, still one machine
(API.md §1): a 3-node RabbitMQ cluster (quorum queues get a member on every node) and a
pg_auto_failover formation (tooling/formation.py), all from the OS packages, data under
RUN_DIR/ha, loopback only. Services get every broker in AMQP_URL (comma-separated) and libpq
multi-host database URLs that pick the node taking writes.

A second `HA=1 make run` reuses what runs; Ctrl-C stops what that run started."""

import json
import os
import secrets
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from shared.settings import Settings
from tooling import devenv
from tooling.access import Users, grant_vhost, provision_broker, url_users
from tooling.devenv import RABBIT_BIN, Rabbit, _apt_install, _port_open, say
from tooling.formation import Formation, pid_alive

# The contract's ports (API.md §1).
MONITOR_PORT = 5431
PG_PORTS = (5432, 5433)
AMQP_PORTS = (5672, 5673, 5674)
# Clients notice a node that stopped answering (frozen, cut off) within two missed heartbeats
# instead of the default minute, and move to another broker.
AMQP_HEARTBEAT_SECONDS = 5


@dataclass
class ClusterNode(Rabbit):
    """One broker of the cluster: a home of its own (log, pid file), the cluster's cookie."""
    dist_port: int = 0
    cluster_home: Path = field(default_factory=Path)

    @property
    def home(self) -> Path:
        return (self.cluster_home / self.node.split("@")[0]).resolve()

    def env(self) -> dict[str, str]:
        env = super().env()
        env["RABBITMQ_DIST_PORT"] = str(self.dist_port)
        # The CLI tools' own distribution ports, below the ephemeral range too (a listening port
        # inside it can be taken by an outgoing connection: `eaddrinuse`, seen here).
        env["RABBITMQ_CTL_DIST_PORT_MIN"] = str(self.dist_port + 100)
        env["RABBITMQ_CTL_DIST_PORT_MAX"] = str(self.dist_port + 120)
        return env

    def pid(self) -> int | None:
        try:
            return int((self.home / "rabbitmq.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def launch(self, cookie: str, seed: str | None = None) -> None:
        """Starts the node; a blank node with a `seed` joins the seed's cluster as it boots
        (classic config peer discovery: no stop_app/join_cluster/start_app round of CLI calls,
        each of which boots an Erlang VM of its own)."""
        home = self.home
        (home / "log").mkdir(parents=True, exist_ok=True)
        cookie_file = home / ".erlang.cookie"
        if not cookie_file.exists() or cookie_file.read_text() != cookie:
            cookie_file.unlink(missing_ok=True)
            cookie_file.write_text(cookie)
            cookie_file.chmod(0o400)
        (home / "enabled_plugins").write_text("[].\n")
        (home / "rabbitmq.conf").write_text(
            "loopback_users = none\n"
            # A node cut off from the others stops serving instead of going on alone.
            "cluster_partition_handling = pause_minority\n"
            + (f"cluster_formation.peer_discovery_backend = classic_config\n"
               f"cluster_formation.classic_config.nodes.1 = {seed}\n" if seed else ""))
        with open(home / "server.log", "ab") as log:
            subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env(), stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_started(self, timeout: float = 120) -> None:
        # The AMQP listener opens as the last step of the boot: no CLI call needed to know.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _port_open(self.port):
                return
            time.sleep(0.2)
        raise SystemExit(f"RabbitMQ node {self.node} did not start; see {self.home / 'server.log'}")


class RabbitCluster:
    """Three nodes on loopback, joined into one cluster. Quacks like devenv.Rabbit where the
    test Stack uses it (ctl, ensure_vhost, delete_vhost, ensure_running, stop)."""

    def __init__(self, run_dir: Path, ports: tuple[int, ...], dist_ports: tuple[int, ...],
                 prefix: str = "inventory-ha") -> None:
        self.run_dir = run_dir
        self.home = (run_dir / "ha" / "rabbitmq").resolve()
        self.users: Users = {"guest": ("guest", None)}  # granted on every vhost; see up()
        self.nodes = [ClusterNode(run_dir, port, f"{prefix}{i + 1}@localhost", dist_port=dist,
                                  cluster_home=self.home)
                      for i, (port, dist) in enumerate(zip(ports, dist_ports, strict=True))]

    @property
    def port(self) -> int:
        return self.nodes[0].port

    def urls(self, user: str, password: str, vhost: str = "") -> str:
        """Every node's AMQP URL, comma-separated; the parts as they stand in a URL (encoded)."""
        return ",".join(f"amqp://{user}:{password}@127.0.0.1:{n.port}/{vhost}?heartbeat={AMQP_HEARTBEAT_SECONDS}"
                        for n in self.nodes)

    def live(self) -> ClusterNode:
        for node in self.nodes:
            pid = node.pid()
            if pid is not None and pid_alive(pid) and _port_open(node.port):
                return node
        raise RuntimeError("no RabbitMQ node of the cluster answers")

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.live().ctl(*args, check=check)

    def ensure_vhost(self, vhost: str, user: str | None = None) -> None:
        """The vhost, with `user` (full rights) or else every user of `users` (tooling/access.py)."""
        self.ctl("add_vhost", vhost, check=False)
        grant_vhost(self, vhost, {user: ("", None)} if user else self.users)

    def delete_vhost(self, vhost: str) -> None:
        self.ctl("delete_vhost", vhost, check=False)

    def _cookie(self) -> str:
        path = self.home / "cookie"
        if not path.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(20))
            path.chmod(0o600)
        return path.read_text().strip()

    def ensure_running(self) -> bool:
        """Starts the nodes that are down (all at once) and joins new ones; True if it started any."""
        if not (RABBIT_BIN / "rabbitmq-server").exists():
            _apt_install("rabbitmq-server")
        down = [n for n in self.nodes if not _port_open(n.port)]
        if not down:
            return False
        say(f"starting RabbitMQ nodes {', '.join(f'{n.node} :{n.port}' for n in down)} (data in {self.home})")
        cookie = self._cookie()
        fresh = not (self.nodes[0].home / "mnesia").exists()
        first = self.nodes[0]
        if fresh:  # the first node boots alone, the others join it as they boot
            first.launch(cookie)
            first.wait_started()
            down.remove(first)
        for node in down:
            node.launch(cookie, seed=first.node if fresh else None)
        for node in down:
            node.wait_started()
        if fresh:
            running = self.running_nodes(first)
            if sorted(running) != sorted(n.node for n in self.nodes):
                raise SystemExit(f"the RabbitMQ cluster has {running}, not all three nodes")
        return True

    def start_node(self, node: ClusterNode) -> None:
        """Restarts one node after a fault; it rejoins the cluster it remembers."""
        node.launch(self._cookie())
        node.wait_started()

    def running_nodes(self, via: ClusterNode) -> list[str]:
        status = json.loads(via.ctl("cluster_status", "--formatter", "json").stdout)
        return list(status.get("running_nodes", []))

    def leader(self, queue: str, vhost: str) -> ClusterNode:
        """The node leading quorum queue `queue` in `vhost`."""
        out = self.ctl("list_queues", "-p", vhost, "name", "leader", "--quiet", "--no-table-headers").stdout
        for line in out.splitlines():
            name, _, node = line.partition("\t")
            if name == queue:
                return next(n for n in self.nodes if n.node == node.strip())
        raise RuntimeError(f"queue {queue} not found in {vhost}")

    def stop(self) -> None:
        # By pid, not by port: the last node standing pauses itself (pause_minority), its AMQP
        # port closed but its VM running.
        say("stopping the RabbitMQ cluster")
        for node in reversed(self.nodes):
            pid = node.pid()
            if pid is not None and pid_alive(pid):
                node.ctl("stop", check=False)


# ----- the contract's HA layout ----------------------------------------------------------------
@dataclass
class Servers:
    formation: Formation
    cluster: RabbitCluster


def contract_servers(run_dir: Path) -> Servers:
    dist = tuple(p + 20000 for p in AMQP_PORTS)  # 25672-25674
    return Servers(Formation(run_dir, MONITOR_PORT, PG_PORTS), RabbitCluster(run_dir, AMQP_PORTS, dist))


def settings_for(base: Settings, servers: Servers) -> Settings:
    """`base` pointed at the formation and the cluster: same users, passwords and databases."""
    def db(url: str) -> str:
        parts = urlsplit(url)
        return servers.formation.dsn(parts.username or "", parts.password or "", parts.path.lstrip("/"))

    def broker(url: str) -> str:
        amqp = urlsplit(url.split(",")[0])
        return servers.cluster.urls(amqp.username or "guest", amqp.password or "guest", amqp.path.lstrip("/"))

    return base.model_copy(update={
        "orders_database_url": db(base.orders_database_url),
        "stock_database_url": db(base.stock_database_url),
        "amqp_url": broker(base.amqp_url),
        "orders_amqp_url": broker(base.orders_amqp_url),  # each service its own user (access.py)
        "stock_amqp_url": broker(base.stock_amqp_url),
    })


def export(settings: Settings) -> None:
    """The URLs for the processes this one starts (honcho, pytest's stacks)."""
    os.environ["ORDERS_DATABASE_URL"] = settings.orders_database_url
    os.environ["STOCK_DATABASE_URL"] = settings.stock_database_url
    os.environ["AMQP_URL"] = settings.amqp_url
    os.environ["ORDERS_AMQP_URL"] = settings.orders_amqp_url
    os.environ["STOCK_AMQP_URL"] = settings.stock_amqp_url


def free_low_port(taken: set[int] | None = None) -> int:
    """A free port below the ephemeral range (32768-60999), for servers the tests start."""
    taken = taken or set()
    for _ in range(200):
        port = 20000 + secrets.randbelow(12000)
        if port in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 32768")


# ----- make run / make test / make down ----------------------------------------------------------
def start(servers: Servers) -> list[Formation | RabbitCluster]:
    """Starts what is not running, both at once; returns what this call started."""
    with ThreadPoolExecutor(2) as pool:
        cluster = pool.submit(servers.cluster.ensure_running)
        formation = pool.submit(servers.formation.ensure_running)
        started: list[Formation | RabbitCluster] = []
        if formation.result():
            started.append(servers.formation)
        if cluster.result():
            started.append(servers.cluster)
    return started


def up(settings: Settings) -> list[Formation | RabbitCluster]:
    """The contract's HA servers, provisioned; the processes started next get their URLs."""
    began = time.monotonic()
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    servers = contract_servers(settings.run_dir)
    started = start(servers)
    ha_settings = settings_for(settings, servers)
    servers.cluster.users = url_users(ha_settings)
    provision_broker(servers.cluster, ha_settings)
    devenv.provision(ha_settings, servers.formation)
    export(ha_settings)
    say(f"HA servers ready in {time.monotonic() - began:.0f} s: RabbitMQ {', '.join(str(p) for p in AMQP_PORTS)}; "
        f"PostgreSQL monitor {MONITOR_PORT}, nodes {', '.join(str(p) for p in PG_PORTS)}")
    return started


def main(command: str, settings: Settings) -> int:
    if command == "up":
        up(settings)
        return 0
    if command == "run":
        return devenv.run(settings, start=up)
    servers = contract_servers(settings.run_dir)
    servers.cluster.stop()
    servers.formation.stop()
    return 0
