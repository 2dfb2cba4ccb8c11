"""constraints.txt, the pins CI and the README install under: complete and in force.

`bash .ci/lock` writes it; these tests fail when it misses a distribution the project needs,
when a build requirement has no pin that satisfies it, or when what is installed is not what
it pins (an install without PIP_CONSTRAINT, or a lock older than pyproject.toml). Under
SAE_FAST_CONSTRAINTS=FILE (`.ci/run` on other pins) they check that file instead.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LOCK = Path(os.environ.get("SAE_FAST_CONSTRAINTS") or REPO / "constraints.txt")


def lines() -> list[str]:
    """The lock's lines that are not comments or blank."""
    text = LOCK.read_text().splitlines()
    return [line for line in text if line.strip() and not line.startswith("#")]


def pins() -> dict[str, str]:
    """Canonical name -> pinned version, from the lock."""
    found = {}
    for line in lines():
        name, sep, version = line.partition("==")
        assert sep and version.strip(), f"{LOCK}: {line!r} is not name==version"
        found[canonicalize_name(name)] = version.strip()
    return found


PINS = pins()


def installed_closure() -> dict[str, str]:
    """Canonical name -> installed version of every distribution that sae-fast, with all its
    extras, needs on this machine and that is installed here (directly or through others)."""
    found: dict[str, str] = {}
    todo = [("sae-fast", frozenset(PROJECT["project"]["optional-dependencies"]))]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in done:
            continue
        done.add((name, extras))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        if name != "sae-fast":
            found[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return found


def test_every_pin_is_one_exact_version_per_distribution():
    assert len(lines()) == len(PINS), "a distribution is pinned twice"
    for version in PINS.values():
        assert Version(version).local is None, "a local label names one machine's build"
    assert PINS["torch"] == "2.13.0"


def test_the_build_requirements_are_pinned():
    for text in PROJECT["build-system"]["requires"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in PINS, f"build requirement {text} has no pin"
        assert req.specifier.contains(PINS[name]), f"{name}=={PINS[name]} breaks {text}"


def test_what_is_installed_is_what_is_pinned():
    closure = installed_closure()
    assert "torch" in closure, "sae-fast is not installed here"
    unpinned = sorted(set(closure) - set(PINS))
    assert not unpinned, f"{LOCK} lacks {unpinned}: run `bash .ci/lock`"
    moved = {
        name: (version, PINS[name])
        for name, version in closure.items()
        if Version(version).public != PINS[name]
    }
    assert not moved, (
        f"installed (left) differs from {LOCK} (right): {moved}; install with "
        f"PIP_CONSTRAINT={LOCK}, or run `bash .ci/lock` to raise the pins"
    )
