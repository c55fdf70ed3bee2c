"""The conceptual diagrams (`PHASE/diagrams/*.svg`, drawn by `phase2_architecture/diagrams/draw.py` with
graphviz) are what the script draws, and each one is shown in a README."""

import importlib.util
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DRAW = "phase2_architecture/diagrams/draw.py"
_spec = importlib.util.spec_from_file_location("diagrams", REPO_ROOT / DRAW)
diagrams = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diagrams)
NAMES = list(diagrams.DIAGRAMS)


def readme_images() -> set[Path]:
    """The files the README images (`![..](path)`) point to, resolved from each README's folder."""
    paths = [REPO_ROOT / "README.md", *REPO_ROOT.glob("*/README.md")]
    return {
        (p.parent / target).resolve()
        for p in paths
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", p.read_text(encoding="utf-8"))
    }


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
    committed = (diagrams.out_dir(name) / f"{name}.dot").read_text(encoding="utf-8")
    assert committed == source, f"{name}.dot drifted: run `python {DRAW}` and commit"
    edges = diagrams.dot_edges(source)
    assert len(edges) >= 5, f"{name}: the edge parser found only {edges}"
    svg_path = diagrams.out_dir(name) / f"{name}.svg"
    assert diagrams.svg_edges(svg_path.read_text(encoding="utf-8")) == edges, (
        f"{name}.svg is stale: run `python {DRAW}`"
    )
    assert svg_path.resolve() in readme_images(), f"no README shows {name}.svg"
