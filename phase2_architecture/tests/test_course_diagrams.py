"""The conceptual diagrams (`docs/diagrams/*.svg`, drawn by `docs/diagrams.py` with graphviz) are what
the script draws, and each one is shown in a README."""

import importlib.util
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("diagrams", REPO_ROOT / "docs" / "diagrams.py")
diagrams = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diagrams)
NAMES = list(diagrams.DIAGRAMS)


def readmes_text() -> str:
    paths = [REPO_ROOT / "README.md", *REPO_ROOT.glob("*/README.md")]
    return "\n".join(p.read_text(encoding="utf-8") for p in paths)


def test_the_seven_diagrams_the_course_needs_exist():
    expected = {
        "transformer_block",
        "gpt",
        "encoder_decoder",
        "moe_dispatch",
        "kv_cache",
        "lora",
        "parallelism",
    }
    assert set(NAMES) == expected


@pytest.mark.parametrize("name", NAMES)
def test_committed_diagram_is_what_the_script_draws_and_a_readme_shows_it(name):
    source = diagrams.dot_source(name)
    committed = (REPO_ROOT / "docs" / "diagrams" / f"{name}.dot").read_text(encoding="utf-8")
    assert committed == source, f"{name}.dot drifted: run `python docs/diagrams.py` and commit"
    edges = diagrams.dot_edges(source)
    assert len(edges) >= 5, f"{name}: the edge parser found only {edges}"
    svg = (REPO_ROOT / "docs" / "diagrams" / f"{name}.svg").read_text(encoding="utf-8")
    assert diagrams.svg_edges(svg) == edges, f"{name}.svg is stale: run `python docs/diagrams.py`"
    assert f"docs/diagrams/{name}.svg" in readmes_text(), f"no README shows {name}.svg"
