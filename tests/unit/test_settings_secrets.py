"""The contract's default URLs come from passwords generated into RUN_DIR (shared/settings.py):
private files, written atomically, the same for every process that starts at once."""

import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from shared.settings import Settings, new_secret, secret

URLS = ("AMQP_URL", "ORDERS_AMQP_URL", "STOCK_AMQP_URL", "ORDERS_DATABASE_URL", "STOCK_DATABASE_URL")


@pytest.fixture
def defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in URLS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RUN_DIR", str(tmp_path))
    return tmp_path


def _secret_in(run_dir: str) -> str:
    return secret(Path(run_dir), "race")


def test_unset_urls_are_the_local_servers_with_generated_per_service_passwords(defaults: Path) -> None:
    settings = Settings()
    urls = {name: urlsplit(getattr(settings, name.lower())) for name in URLS}
    assert {name: (u.hostname, u.port) for name, u in urls.items()} == {
        "AMQP_URL": ("127.0.0.1", 5672), "ORDERS_AMQP_URL": ("127.0.0.1", 5672),
        "STOCK_AMQP_URL": ("127.0.0.1", 5672), "ORDERS_DATABASE_URL": ("127.0.0.1", 5432),
        "STOCK_DATABASE_URL": ("127.0.0.1", 5432)}
    assert [urls[n].username for n in URLS] == ["inventory-admin", "orders", "stock", "orders", "stock"]
    passwords = [urls[n].password for n in URLS]
    assert len(set(passwords)) == len(passwords)  # one each, none shared
    assert all(p and len(p) >= 24 and p not in ("guest", "orders", "stock") for p in passwords)
    assert Settings().orders_database_url == settings.orders_database_url  # kept, not remade
    for path in (defaults / "secrets").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((defaults / "secrets").stat().st_mode) == 0o700


def test_an_explicit_amqp_url_is_every_services_unless_overridden(defaults: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp://guest:guest@127.0.0.1:5702/")
    settings = Settings()
    assert settings.orders_amqp_url == settings.stock_amqp_url == "amqp://guest:guest@127.0.0.1:5702/"
    monkeypatch.setenv("STOCK_AMQP_URL", "amqp://s:p@127.0.0.1:5702/")
    assert Settings().stock_amqp_url == "amqp://s:p@127.0.0.1:5702/"
    assert not (defaults / "secrets" / "orders-amqp-password").exists()


def test_processes_generating_a_secret_at_once_all_get_the_same(tmp_path: Path) -> None:
    with ProcessPoolExecutor(8) as pool:
        values = set(pool.map(_secret_in, [str(tmp_path)] * 32))
    assert len(values) == 1
    assert [p.name for p in (tmp_path / "secrets").iterdir()] == ["race"]  # no temporary left


def test_a_generated_secret_is_safe_on_a_command_line_and_in_a_url() -> None:
    # token_urlsafe could start with "-": rabbitmqctl add_user then read the password as an option
    for _ in range(2000):
        value = new_secret()
        assert len(value) >= 32 and all(c in "0123456789abcdef" for c in value)
