"""The operator docs stay true to the code: every setting documented with its default, every link resolves."""

from __future__ import annotations

import re

from iota.config.settings import all_fields
from tests.ops import REPO

DOCS = REPO / "docs"


def test_configuration_lists_every_setting_with_its_default() -> None:
    text = (DOCS / "configuration.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(IOTA_[A-Z0-9_]+)` \| ([^|]+) \|", text, re.M)}
    for name, (default, _) in all_fields().items():
        assert name in rows, f"{name} is missing from docs/configuration.md"
        shown = rows[name].strip()
        want = (
            "(empty)"
            if default == ""
            else f"`{str(default).lower() if isinstance(default, bool) else default}`"
        )
        assert shown == want, f"{name}: docs say {shown}, the code's default is {want}"
    unknown = set(rows) - set(all_fields()) - {"IOTA_SKIP_SETUP", "IOTA_LOG_DIR"}
    assert not unknown, f"docs/configuration.md lists settings the code does not have: {sorted(unknown)}"


def test_links_between_docs_resolve() -> None:
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
