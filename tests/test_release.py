"""One version everywhere: both Python distributions, the Node.js package and
the newest release in CHANGELOG.md (Keep a Changelog) agree."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHANGELOG = (ROOT / "CHANGELOG.md").read_text()
RELEASE = re.compile(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})$", re.M)


def _versions() -> dict[str, str]:
    def pyproject(path: Path) -> str:
        version: str = tomllib.loads(path.read_text())["project"]["version"]
        return version

    node: str = json.loads((ROOT / "clients" / "node" / "package.json").read_text())["version"]
    return {
        "pyproject.toml": pyproject(ROOT / "pyproject.toml"),
        "clients/python/pyproject.toml": pyproject(ROOT / "clients" / "python" / "pyproject.toml"),
        "clients/node/package.json": node,
    }


def test_every_package_has_the_changelogs_newest_version() -> None:
    releases = RELEASE.findall(CHANGELOG)
    assert releases, "CHANGELOG.md has no '## [X.Y.Z] - YYYY-MM-DD' heading"
    newest = releases[0][0]
    assert _versions() == dict.fromkeys(_versions(), newest)


def test_changelog_keeps_an_unreleased_section_and_links_every_version() -> None:
    headings = re.findall(r"^## \[([^\]]+)\]", CHANGELOG, re.M)
    assert headings[0] == "Unreleased"
    for version in headings:
        assert re.search(rf"^\[{re.escape(version)}\]: \S+$", CHANGELOG, re.M), version


def test_server_requires_the_client_of_its_own_version() -> None:
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"cachecoord-client=={server['version']}" in server["dependencies"]
