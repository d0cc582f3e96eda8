"""`make observe`: Prometheus from the OS packages, scraping every process of a running `make run`
(gateway, orders, stock API, each stock worker, RabbitMQ's own plugin) with the alert rules of
deploy/prometheus/rules. Data under RUN_DIR/prometheus; Ctrl-C stops it."""

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from shared.settings import Settings, get_settings
from tooling.devenv import PROMETHEUS_PORT_OFFSET, say, wait_ready

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules"


def ensure_prometheus() -> Path:
    """The prometheus binary (Debian's `prometheus` package, which brings promtool too)."""
    found = shutil.which("prometheus")
    if found is None or shutil.which("promtool") is None:
        say("installing prometheus from the OS packages")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        # No recommends: the node exporter would start a daemon of its own.
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        found = shutil.which("prometheus")
    assert found is not None, "the prometheus package installs /usr/bin/prometheus"
    return Path(found)


def targets(settings: Settings, worker_port: int | None = None,
            ports: dict[str, int] | None = None) -> dict[str, list[str]]:
    """Job name -> host:port of every process `make run` starts with these settings."""
    ports = ports or {"gateway": settings.gateway_port, "orders": settings.orders_port,
                      "stock-api": settings.stock_port}
    first = settings.stock_worker_port if worker_port is None else worker_port
    jobs = {job: [f"127.0.0.1:{port}"] for job, port in ports.items()}
    jobs["stock-worker"] = [f"127.0.0.1:{first + i}" for i in range(settings.stock_workers)]
    amqp = urlsplit(settings.amqp_url.split(",")[0])
    if amqp.hostname in ("127.0.0.1", "localhost"):
        jobs["rabbitmq"] = [f"127.0.0.1:{(amqp.port or 5672) + PROMETHEUS_PORT_OFFSET}"]
    return jobs


def config(jobs: dict[str, list[str]], scrape_interval: str = "15s") -> str:
    document = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(RULES / "*.yml")],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": hosts}]}
                           for job, hosts in jobs.items()],
    }
    return "# Written by tooling/observe.py for the local processes; do not edit.\n" + yaml.safe_dump(
        document, sort_keys=False)


def start(config_file: Path, data: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    data.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(ensure_prometheus()), f"--config.file={config_file}", f"--storage.tsdb.path={data}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=2d"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PROMETHEUS_PORT", "9090")))
    args = parser.parse_args()
    settings = get_settings()
    home = (settings.run_dir / "prometheus").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config_file = home / "prometheus.yml"
    config_file.write_text(config(targets(settings)))
    server = start(config_file, home / "data", args.port, home / "server.log")
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    url = f"http://127.0.0.1:{args.port}"
    if wait_ready(f"{url}/-/ready", timeout=60):
        say(f"Prometheus: {url}  (targets: {url}/targets, alerts: {url}/alerts)")
        say(f"config {config_file}, log {home / 'server.log'}; Ctrl-C stops it")
    try:
        code = server.wait()
    except KeyboardInterrupt:
        server.terminate()
        code = server.wait()
    sys.exit(0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code)


if __name__ == "__main__":
    main()
