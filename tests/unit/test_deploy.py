"""What ships under deploy/ is valid: the alert rules pass their promtool unit tests, the
Prometheus configs load, the dashboard queries only metrics the services export, and compose's
`observe` profile runs Prometheus and Grafana with them."""

import json
import re
import subprocess
from pathlib import Path

import yaml

from shared.metrics import FAMILIES
from shared.settings import Settings
from tooling.devenv import Rabbit
from tooling.observe import config, ensure_prometheus, targets

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
JOBS = {"gateway", "orders", "stock-api", "stock-worker", "rabbitmq"}


def promtool(*args: str, cwd: Path = DEPLOY / "prometheus") -> str:
    ensure_prometheus()
    done = subprocess.run(["promtool", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    out = promtool("test", "rules", "tests/inventory.test.yml")
    assert "SUCCESS" in out


def test_every_alert_has_a_unit_test() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus/rules/inventory.rules.yml").read_text())
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"]}
    tests = yaml.safe_load((DEPLOY / "prometheus/tests/inventory.test.yml").read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"]
              if t["exp_alerts"]}
    assert alerts == tested
    assert {"OrdersPendingTooLong", "OutboxBacklogOld", "DeadLetters", "ReservationDecisionSlow",
            "HTTP5xxRate", "TargetDown", "NoStockWorker", "HoldSweepBehind"} <= alerts


def test_compose_prometheus_config_scrapes_every_process(tmp_path: Path) -> None:
    text = (DEPLOY / "prometheus/prometheus.yml").read_text()
    # promtool resolves rule_files; point them at the repository's rules to check those too
    local = tmp_path / "prometheus.yml"
    local.write_text(text.replace("/etc/prometheus/rules/*.yml", str(DEPLOY / "prometheus/rules/*.yml")))
    promtool("check", "config", str(local))
    jobs = {job["job_name"] for job in yaml.safe_load(text)["scrape_configs"]}
    assert jobs == JOBS


def test_make_observe_config_lists_every_local_process(tmp_path: Path) -> None:
    settings = Settings(stock_workers=3, stock_worker_port=8010, amqp_url="amqp://u:p@127.0.0.1:5672/")
    jobs = targets(settings)
    assert jobs["stock-worker"] == ["127.0.0.1:8010", "127.0.0.1:8011", "127.0.0.1:8012"]
    assert jobs["rabbitmq"] == ["127.0.0.1:15692"]
    assert set(jobs) == JOBS
    path = tmp_path / "prometheus.yml"
    path.write_text(config(jobs))
    promtool("check", "config", str(path))


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/flash-sale.json").read_text())
    exported = {family._name for families in FAMILIES.values() for family in families}
    known = exported | {"up", "process_cpu_seconds_total", "erlang_vm_statistics_runtime_milliseconds"}
    titles = {panel["title"] for panel in dashboard["panels"]}
    for wanted in ("Orders/s by status", "Stock decision latency", "Holds by outcome (/s)",
                   "Outbox backlog (rows)", "Dead-letter queue depth", "CPU per process (cores)"):
        assert wanted in titles
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\b([a-z_]+)(?:\{|\[)", target["expr"]))
            names = {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in names}
            assert names <= {re.sub(r"_total$", "", n) for n in known}, (panel["title"], names)


def test_compose_observe_profile() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observe"], name
    mounted = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    for path in ("deploy/prometheus/prometheus.yml", "deploy/prometheus/rules",
                 "deploy/grafana/provisioning", "deploy/grafana/dashboards"):
        assert f"./{path}:" in mounted, path
        assert (ROOT / path).exists(), path
    assert any("enabled_plugins" in v for v in services["rabbitmq"]["volumes"])
    assert "rabbitmq_prometheus" in (DEPLOY / "rabbitmq/enabled_plugins").read_text()
    assert "healthcheck" in services["stock-worker"]


def test_rabbitmq_prometheus_port_follows_the_amqp_port(tmp_path: Path) -> None:
    assert Rabbit(tmp_path, 5672).prometheus_port == 15692  # RabbitMQ's own default
    assert Rabbit(tmp_path, 5673).prometheus_port == 15693  # HA: one per node
    assert Rabbit(tmp_path, 60000).prometheus_port == 49980  # stays a valid port


def test_the_local_broker_runs_without_the_management_statistics(tmp_path: Path) -> None:
    """The Prometheus plugin brings the management agent; its statistics collectors serve only a
    management UI, which `make run` has not, and cost the idle broker CPU."""
    conf = Rabbit(tmp_path, 5672).config(prometheus=True)
    assert "prometheus.tcp.port = 15692" in conf
    assert "management_agent.disable_metrics_collector = true" in conf.splitlines()
    assert Rabbit(tmp_path, 5672).config(prometheus=False) == "loopback_users = none\n"

