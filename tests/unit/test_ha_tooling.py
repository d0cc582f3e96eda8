"""The pure parts of `HA=1` (tooling/ha.py, tooling/formation.py, tooling/stack.py): the URLs the
services get, what counts as local, and the HA suite's measure of a pause in decisions."""

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from shared.settings import Settings
from tests.ha.checks import longest_pause
from tooling.devenv import _is_local
from tooling.formation import Formation
from tooling.ha import (
    AMQP_PORTS,
    MONITOR_PORT,
    PG_PORTS,
    RabbitCluster,
    contract_servers,
    settings_for,
)
from tooling.stack import _with_db, _with_vhost


def test_the_contract_ports() -> None:
    servers = contract_servers(Path("/tmp/nowhere"))
    assert [n.port for n in servers.cluster.nodes] == [5672, 5673, 5674] == list(AMQP_PORTS)
    assert [n.dist_port for n in servers.cluster.nodes] == [25672, 25673, 25674]
    assert servers.formation.monitor.port == MONITOR_PORT == 5431
    assert [n.port for n in servers.formation.nodes] == [5432, 5433] == list(PG_PORTS)
    assert len({n.node for n in servers.cluster.nodes}) == 3  # distinct node names


def test_services_get_every_broker_and_a_multi_host_database_url() -> None:
    servers = contract_servers(Path("/tmp/nowhere"))
    base = Settings(orders_database_url="postgresql://orders:s3cret@127.0.0.1:5432/orders",
                    stock_database_url="postgresql://stock:pw@127.0.0.1:5432/stock",
                    amqp_url="amqp://app:p%40ss@127.0.0.1:5672/shop")
    ha = settings_for(base, servers)
    assert ha.orders_database_url == ("postgresql://orders:s3cret@127.0.0.1:5432,127.0.0.1:5433/orders"
                                      "?target_session_attrs=read-write")
    assert ha.stock_database_url.startswith("postgresql://stock:pw@127.0.0.1:5432,127.0.0.1:5433/stock?")
    brokers = ha.amqp_url.split(",")
    assert [urlsplit(u).port for u in brokers] == [5672, 5673, 5674]
    for url in brokers:
        parts = urlsplit(url)
        assert (parts.username, parts.password, parts.path) == ("app", "p%40ss", "/shop")
        assert "heartbeat=5" in parts.query


@pytest.mark.parametrize(("url", "local"), [
    ("postgresql://a:b@127.0.0.1:5432,127.0.0.1:5433/x?target_session_attrs=read-write", True),
    ("postgresql://a:b@127.0.0.1:5432,db.example:5433/x", False),
    ("postgresql://a:b@[::1]:5432/x", True),
    ("postgresql://a:b@localhost/x", True),
    ("amqp://g:g@rabbit:5672/", False),
])
def test_local_means_every_host_is_this_machine(url: str, local: bool) -> None:
    assert _is_local(url) is local


def test_a_stack_puts_its_vhost_on_every_broker_and_its_database_on_every_host() -> None:
    cluster = RabbitCluster(Path("/tmp/nowhere"), (1, 2, 3), (4, 5, 6))
    urls = _with_vhost(cluster.urls("guest", "guest"), "test-x").split(",")
    assert [urlsplit(u).path for u in urls] == ["/test-x"] * 3
    assert all("heartbeat=5" in urlsplit(u).query for u in urls)
    formation = Formation(Path("/tmp/nowhere"), 10, (11, 12))
    dsn = _with_db(formation.dsn("orders", "pw", "orders"), "orders_abc")
    assert dsn == "postgresql://orders:pw@127.0.0.1:11,127.0.0.1:12/orders_abc?target_session_attrs=read-write"


def test_the_longest_pause_counts_from_the_fault() -> None:
    assert longest_pause([1.0, 2.0, 10.0, 10.5], since=0.0) == 8.0
    assert longest_pause([1.0, 2.0, 10.0, 10.5], since=9.0) == 1.0  # fault to the first decision
    assert longest_pause([1.0], since=5.0) == float("inf")  # nothing decided after the fault
