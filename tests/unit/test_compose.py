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
