"""Settings of every process, read from the environment (names and defaults are the contract)."""

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Self

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

AMQP_ADMIN = "inventory-admin"  # the local broker's administrator (tools, tests), not a service


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    gateway_port: int = 8000
    orders_port: int = 8001
    stock_port: int = 8002
    bind_host: str = "127.0.0.1"
    stock_workers: int = 2
    stock_worker_port: int = 8010
    # Which worker this is (0-based): its probe port is stock_worker_port + index. Unset: the
    # index honcho gives (`make run`: HONCHO_PROCESS_NAME=stock-worker.1 is worker 0), else 0.
    stock_worker_index: int | None = None
    honcho_process_name: str = ""
    reservation_ttl_seconds: float = 1800
    sweep_interval_seconds: float = 5
    admin_token: str | None = None

    # Unset: the local servers of `make run`, each service its own user and a password generated
    # into RUN_DIR/secrets (see `local_urls`). AMQP_URL, when set, is every service's broker
    # URL; ORDERS_AMQP_URL / STOCK_AMQP_URL override it for one service.
    amqp_url: str = ""
    orders_database_url: str = ""
    stock_database_url: str = ""
    orders_amqp_url: str = ""
    stock_amqp_url: str = ""
    # The ports of the local servers `make run` starts when no URL is given (not the contract's
    # business: only for running that setup beside another one).
    local_pg_port: int = 5432
    local_amqp_port: int = 5672

    # Comma-separated upstream lists for the gateway; empty means the local ports above.
    orders_urls: str = ""
    stock_urls: str = ""
    upstream_timeout_seconds: float = 10.0

    run_dir: Path = Path(".run")
    log_level: str = "INFO"
    access_log: bool = False
    db_pool_size: int = 10
    # At least twice batch_size: a worker's batch can only hold what the broker let it have
    # (64: batches of ~29 under a backlog; 256: ~91, and 20% less CPU per order, measured).
    prefetch_count: int = 256
    batch_size: int = 100  # PedidoCriado decided together in one transaction, at most
    delivery_limit: int = 5
    sweep_batch_size: int = 200
    sse_ping_seconds: float = 15
    # Off only to simulate a crash between commit and publish (tests/faults): events then wait
    # in the outbox until a process with the relay on starts.
    outbox_relay: bool = True
    import_max_bytes: int = 64 * 1024 * 1024
    # An order `pending` or `confirming` this long is asked about again (orders/reconciler.py);
    # with the look every interval, it is decided again well within the 5 minutes of API.md §6
    # even when the first asking again is lost too.
    reconcile_after_seconds: float = 120
    reconcile_interval_seconds: float = 15
    reconcile_batch_size: int = 100
    # Retention (shared/retention.py): how often one process per service deletes what is due.
    retention_interval_seconds: float = 600
    retention_batch_size: int = 1000
    # Capacity of each process (API.md §1): beyond, 503 with Retry-After. The gateway's pool of
    # upstream connections is bounded by max_connections too (one per client request at most).
    max_connections: int = 4096
    max_long_polls: int = 10000
    max_feed_streams: int = 1000

    @property
    def orders_upstreams(self) -> list[str]:
        return _split(self.orders_urls) or [f"http://127.0.0.1:{self.orders_port}"]

    @property
    def stock_upstreams(self) -> list[str]:
        return _split(self.stock_urls) or [f"http://127.0.0.1:{self.stock_port}"]

    @property
    def worker_probe_port(self) -> int:
        index = self.stock_worker_index
        if index is None:
            _, _, number = self.honcho_process_name.rpartition(".")
            index = int(number) - 1 if number.isdigit() else 0
        return self.stock_worker_port + index

    @model_validator(mode="after")
    def local_urls(self) -> Self:
        """The contract's defaults: the local servers, with generated per-service passwords."""
        if not self.orders_database_url:
            self.orders_database_url = self._local_pg("orders")
        if not self.stock_database_url:
            self.stock_database_url = self._local_pg("stock")
        if not self.amqp_url:
            self.amqp_url = self._local_amqp(AMQP_ADMIN)
            self.orders_amqp_url = self.orders_amqp_url or self._local_amqp("orders")
            self.stock_amqp_url = self.stock_amqp_url or self._local_amqp("stock")
        self.orders_amqp_url = self.orders_amqp_url or self.amqp_url
        self.stock_amqp_url = self.stock_amqp_url or self.amqp_url
        return self

    def _local_pg(self, service: str) -> str:
        password = secret(self.run_dir, f"{service}-db-password")
        return f"postgresql://{service}:{password}@127.0.0.1:{self.local_pg_port}/{service}"

    def _local_amqp(self, user: str) -> str:
        return f"amqp://{user}:{secret(self.run_dir, f'{user}-amqp-password')}@127.0.0.1:{self.local_amqp_port}/"

    def resolved_admin_token(self) -> str:
        """ADMIN_TOKEN if set, else the token kept in `.run/admin-token` (made on first use)."""
        if self.admin_token:
            return self.admin_token
        return secret(self.run_dir, "admin-token", self.run_dir / "admin-token")


def new_secret() -> str:
    """A generated password or token: hex only, so it never starts with `-` (rabbitmqctl and
    other command lines would read it as an option) and needs no escaping in a URL."""
    return secrets.token_hex(24)


def secret(run_dir: Path, name: str, path: Path | None = None) -> str:
    """The secret `name` kept in RUN_DIR/secrets (or at `path`), generated on first use: readable
    by its owner only, and written atomically (a private temporary file linked into place), so
    processes starting at once all read the one that won, never a half-written one."""
    path = path or run_dir / "secrets" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (new_secret() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)  # fails if another process got there first: theirs wins
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
    return path.read_text().strip()


def _split(value: str) -> list[str]:
    return [part.strip().rstrip("/") for part in value.split(",") if part.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
