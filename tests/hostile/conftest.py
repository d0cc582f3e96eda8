import uuid
from collections.abc import Iterator

import pytest

from tooling.stack import Stack


@pytest.fixture(scope="session")
def hostile_stack(infrastructure: None) -> Iterator[Stack]:
    """One system with the contract's defaults for the hostile suite (started once: it is what a
    CI budget allows); test_capacity.py runs its own, with caps it can reach."""
    running = Stack(f"h{uuid.uuid4().hex[:8]}", workers=2).start()
    yield running
    running.stop()
