import uuid
from collections.abc import Iterator

import pytest

from tooling.stack import Stack, ensure_infrastructure


@pytest.fixture(scope="session")
def infrastructure() -> None:
    ensure_infrastructure()


@pytest.fixture(scope="module")
def stack(infrastructure: None) -> Iterator[Stack]:
    """The system with the contract's defaults (30-minute holds) and 3 stock workers."""
    running = Stack(f"m{uuid.uuid4().hex[:8]}", workers=3).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def short_stack(infrastructure: None) -> Iterator[Stack]:
    """Holds of 3 s, swept every 0.5 s: a hold's whole life within a test."""
    running = Stack(f"s{uuid.uuid4().hex[:8]}", workers=3, env_overrides={
        "RESERVATION_TTL_SECONDS": "3", "SWEEP_INTERVAL_SECONDS": "0.5"}).start()
    yield running
    running.stop()
