"""compose.yaml parses, and names every service the README mentions."""

import re
from pathlib import Path

import yaml

from tooling.access import EVENTS, RESOURCES
from tooling.broker_setup import requests

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"postgres", "rabbitmq", "gateway", "orders", "stock-api", "stock-worker"}


def test_compose_parses_and_has_every_service() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert SERVICES <= set(compose["services"])
    assert compose["services"]["stock-worker"]["deploy"]["replicas"] == 3
    assert {"pgdata", "rabbitdata"} <= set(compose["volumes"])
    for name in ("postgres", "rabbitmq", "gateway", "orders", "stock-api"):
        assert "healthcheck" in compose["services"][name], name


def test_readme_names_only_services_compose_defines() -> None:
    readme = (ROOT / "README.md").read_text()
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for service in SERVICES:
        assert service in readme, service
        assert service in compose["services"], service


def test_ha_profile_is_a_three_node_rabbitmq_cluster() -> None:
    """`--profile ha`: three brokers with one cookie that join one cluster (classic config)."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    nodes = {name: s for name, s in compose["services"].items() if "ha" in s.get("profiles", [])}
    assert sorted(nodes) == ["rabbit-1", "rabbit-2", "rabbit-3"]
    conf = (ROOT / "deploy" / "rabbitmq" / "cluster.conf").read_text()
    cookies = set()
    for name, service in nodes.items():
        assert service["hostname"] == name
        assert f"classic_config.nodes.{name[-1]} = rabbit@{name}" in conf
        assert "./deploy/rabbitmq/cluster.conf:/etc/rabbitmq/rabbitmq.conf:ro" in service["volumes"]
        data = [v for v in service["volumes"] if v.endswith(":/var/lib/rabbitmq")]
        assert len(data) == 1 and data[0].split(":")[0] in compose["volumes"]
        cookies.add(service["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"])
        assert "healthcheck" in service
    assert len(cookies) == 1 and "-setcookie" in cookies.pop()
    assert {"rabbit1data", "rabbit2data", "rabbit3data"} <= set(compose["volumes"])
    for name in ("rabbit-2", "rabbit-3"):
        assert nodes[name]["depends_on"]["rabbit-1"]["condition"] == "service_healthy"
    assert "cluster_partition_handling = pause_minority" in conf
    # The services of the plain `docker compose up` are in no profile: unchanged by `ha`.
    assert all("profiles" not in compose["services"][s] for s in SERVICES)


# ----- secrets and exposure (issue 10 item 4) ---------------------------------------------------
INTERPOLATION = re.compile(r"\$\{([A-Z_]+)(:?[-?])?([^}]*)\}")
SECRET = re.compile(r"PASSWORD|TOKEN|SECRET")


def _strings(node: object) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return [node] if isinstance(node, str) else []


def test_every_secret_is_required_with_no_default() -> None:
    text = (ROOT / "compose.yaml").read_text()
    secrets = [m for m in INTERPOLATION.finditer(text) if SECRET.search(m.group(1))]
    names = {m.group(1) for m in secrets}
    assert {"ADMIN_TOKEN", "POSTGRES_PASSWORD", "RABBITMQ_ADMIN_PASSWORD", "ORDERS_DB_PASSWORD",
            "STOCK_DB_PASSWORD", "ORDERS_MIGRATOR_PASSWORD", "STOCK_MIGRATOR_PASSWORD",
            "ORDERS_AMQP_PASSWORD", "STOCK_AMQP_PASSWORD"} <= names
    for m in secrets:
        assert m.group(2) == ":?", f"${{{m.group(1)}}} must be required (:?), not defaulted"
    assert "change-me" not in text


def test_no_password_is_written_in_compose_and_none_equals_its_user() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for value in _strings(compose):
        for user, password in re.findall(r"://([^:/@]+):([^@]*)@", value):
            assert password.startswith("${") and password.endswith("}"), value
            assert password != user, value
    for service in compose["services"].values():
        for name, value in (service.get("environment") or {}).items():
            if SECRET.search(name) or name.endswith("_PASS"):
                assert str(value).startswith("${") and ":?" in str(value), (name, value)


def test_management_and_databases_are_not_published_on_every_interface() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for name in ("rabbitmq", "postgres"):
        for port in compose["services"][name].get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert any("15672" in str(p) for p in compose["services"]["rabbitmq"]["ports"])


def test_each_services_broker_user_may_publish_only_its_own_events() -> None:
    calls = dict(requests({"orders": "o-secret", "stock": "s-secret"}))
    assert calls["/api/topic-permissions/%2F/orders"]["write"] == \
        "^(PedidoCriado|PedidoConfirmado|PedidoCancelado)$"
    assert calls["/api/topic-permissions/%2F/stock"]["write"] == "^(AtualizarStatus|EstoqueAlterado)$"
    for service in EVENTS:
        assert calls[f"/api/permissions/%2F/{service}"]["write"] == RESOURCES
        assert not re.match(RESOURCES, "amq.default")  # no way around the topic permissions
        assert calls[f"/api/users/{service}"]["password"] != service


def test_compose_postgres_init_makes_migrators_own_the_databases() -> None:
    init = (ROOT / "deploy" / "postgres" / "init.sh").read_text()
    for database in ("orders", "stock"):
        assert f"CREATE DATABASE {database} OWNER {database}_migrator" in init
        assert f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {database}" in init
