"""compose.yaml parses, and names every service the README mentions."""

from pathlib import Path

import yaml

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
