"""pyproject.toml declares exactly the floors CI's oldest leg installs (constraints-oldest.txt): no version is
declared supported that no test has run on."""

import re

import pytest

from conftest import REPO


def test_pyproject_floors_are_the_pins_of_cis_oldest_leg():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    floors = {}
    for requirement in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9A-Za-z.]*)", requirement)
        assert match, f"{requirement!r}: declare a dependency as NAME>=FLOOR, its floor pinned in constraints-oldest.txt"
        floors[match[1].lower()] = match[2]
    pins = {}
    for line in (REPO / "constraints-oldest.txt").read_text().splitlines():
        if line.split("#")[0].strip():
            name, version = line.split("#")[0].strip().split("==")
            pins[name.lower()] = version
    assert floors == pins
    assert "-c constraints-oldest.txt" in (REPO / ".ci" / "run").read_text()  # and CI installs and tests them
