import uuid
from collections.abc import Iterator

import pytest

from tooling.stack import Stack

# Caps low enough that a test can reach them with a few hundred connections; the contract's
# defaults (API.md §1) are tested as defaults in tests/unit.
CAPS = {"MAX_CONNECTIONS": "600", "MAX_LONG_POLLS": "50", "MAX_FEED_STREAMS": "20"}


@pytest.fixture(scope="session")
def hostile_stack(infrastructure: None) -> Iterator[Stack]:
    """One system for the whole hostile suite (started once: it is what a CI budget allows)."""
    running = Stack(f"h{uuid.uuid4().hex[:8]}", workers=2, env_overrides=CAPS).start()
    yield running
    running.stop()
