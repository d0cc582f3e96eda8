"""The lock files pin what pyproject.toml asks for: a dependency added or re-bounded without
`make lock` fails here, not on the next fresh machine."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def pins(lock: str) -> dict[str, str]:
    text = (ROOT / lock).read_text()
    return {canonicalize_name(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9._-]+)==(\S+)", text, re.M)}


def requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        found += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return found


def test_every_dependency_has_an_upper_bound() -> None:
    for requirement in requirements("test", "bench"):
        assert any(s.operator in ("<", "<=", "==", "~=") for s in requirement.specifier), requirement


def test_locks_pin_every_dependency_within_its_bounds() -> None:
    for lock, extras in (("requirements.lock", ()), ("requirements-dev.lock", ("test", "bench"))):
        pinned = pins(lock)
        for requirement in requirements(*extras):
            name = canonicalize_name(requirement.name)
            assert name in pinned, f"{name} missing from {lock}: run `make lock`"
            assert requirement.specifier.contains(pinned[name]), (lock, name, pinned[name])
        assert "--hash=sha256:" in (ROOT / lock).read_text()
