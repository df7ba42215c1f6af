"""docs/deviations.md has a section per probe and `engine probes describe` points to it; what a user
reads (probe docs, README) refers to files the project ships, not to outside notes."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.probe import PROBE_REGISTRY, get_probe_class

ROOT = Path(__file__).resolve().parents[2]
DEVIATIONS = ROOT / "docs" / "deviations.md"
NOT_SHIPPED = re.compile(r"original-system|design\.md|shared/|§")


def test_every_probe_has_a_section():
    headings = set(re.findall(r"^## (\S+)\s*$", DEVIATIONS.read_text(), flags=re.MULTILINE))
    assert set(PROBE_REGISTRY) <= headings


@pytest.mark.parametrize("name", sorted(PROBE_REGISTRY))
def test_describe_points_to_the_probes_section(name):
    result = CliRunner().invoke(app, ["probes", "describe", name])
    assert result.exit_code == 0, result.output
    assert f"docs/deviations.md#{name}" in result.output
    assert not NOT_SHIPPED.search(result.output)


def test_readme_and_probe_docs_name_no_unshipped_notes():
    texts = {"README.md": (ROOT / "README.md").read_text(), "docs/deviations.md": DEVIATIONS.read_text()}
    for name in PROBE_REGISTRY:
        module = sys.modules[get_probe_class(name).__module__]
        texts[module.__name__] = module.__doc__ or ""
    assert {where: NOT_SHIPPED.findall(text) for where, text in texts.items() if NOT_SHIPPED.search(text)} == {}
