"""requirements.lock, which setup.sh installs: exact pins that agree with pyproject.toml, so that a change of the
dependencies without `bash setup.sh lock` fails here rather than in a user's first install."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11 on")


def pins() -> dict[str, Version]:
    found: dict[str, Version] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, version = line.partition("==")
        assert version and canonicalize_name(name) not in found, line  # one exact pin per package
        found[canonicalize_name(name)] = Version(version)
    return found


def test_every_requirement_of_every_role_is_pinned_at_a_version_it_allows() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = pins()
    extras = [line for lines in project["optional-dependencies"].values() for line in lines]
    for line in project["dependencies"] + extras:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement.name} is not in requirements.lock: run `bash setup.sh lock`"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"requirements.lock pins {name}=={lock[name]}, which {line!r} does not allow: run `bash setup.sh lock`"
        )


def test_a_build_label_is_not_pinned() -> None:
    # torch is 2.13.0+cpu here and +cu128 on a GPU machine: one lock must hold for both.
    assert all(version.local is None for version in pins().values())
