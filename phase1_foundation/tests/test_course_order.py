"""The course reads in order: every phase imports only itself and earlier phases, never a later one.

Checked on every Python file and every notebook code cell under phase1_foundation .. phase5_production
(src, tests, notebooks, benchmarks), by parsing the imports with `ast`. No phase imports the
production `sparse_moe_transformer` either: it makes itself servable from its own side (a loader that
Phase 5's server finds through an entry point), and its tests of Phase 5's tools live in its own folder.
"""

import ast
import os
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PHASES = [
    "phase1_foundation",
    "phase2_architecture",
    "phase3_components",
    "phase4_training",
    "phase5_production",
]
PRODUCTION = "sparse_moe_transformer"


def imported_packages(source: str) -> list[tuple[int, str]]:
    """(line, top-level package) for every `import x...` and `from x... import` in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def notebook_source(path: Path) -> str:
    """The code cells of a notebook as one Python source (IPython magics and shell lines dropped)."""
    nb = nbformat.read(path, as_version=4)
    cells = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    lines = [line for cell in cells for line in cell.splitlines() if not line.lstrip().startswith(("%", "!"))]
    return "\n".join(lines)


def later_imports(phase: str, relative_path: str, source: str) -> list[str]:
    """The imports in `source` (a file of `phase`) that reach a later phase or the production model."""
    rank = PHASES.index(phase)
    problems = []
    for line, package in imported_packages(source):
        if package in PHASES and PHASES.index(package) > rank:
            problems.append(f"{relative_path}:{line} imports {package}, a later phase than {phase}")
        if package == PRODUCTION:
            problems.append(f"{relative_path}:{line} imports {PRODUCTION}; the course must not depend on it")
    return problems


def phase_files(phase: str) -> list[Path]:
    files = []
    for folder, subfolders, names in os.walk(REPO_ROOT / phase):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d != "__pycache__"]
        files += [Path(folder) / n for n in names if n.endswith((".py", ".ipynb"))]
    return sorted(files)


def test_the_checker_catches_a_later_phase_and_the_production_model():
    source = "import numpy\nfrom phase1_foundation.src import x\nfrom phase3_components.src.y import z\n"
    assert later_imports("phase2_architecture", "a.py", source) == [
        "a.py:3 imports phase3_components, a later phase than phase2_architecture"
    ]
    assert later_imports("phase3_components", "a.py", source) == []
    assert len(later_imports("phase4_training", "b.py", "import sparse_moe_transformer.src.train")) == 1
    served = "phase5_production/src/served_models.py"
    assert later_imports("phase5_production", served, "def f():\n    import sparse_moe_transformer\n") == [
        f"{served}:2 imports sparse_moe_transformer; the course must not depend on it"
    ]
    # imports inside functions count too (ast.walk sees every node)
    assert len(later_imports("phase1_foundation", "c.py", "def f():\n    import phase2_architecture\n")) == 1


@pytest.mark.parametrize("phase", PHASES)
def test_phase_imports_only_itself_and_earlier_phases(phase):
    files = phase_files(phase)
    assert any(f.suffix == ".ipynb" for f in files) and any(f.suffix == ".py" for f in files)
    problems = []
    for path in files:
        source = notebook_source(path) if path.suffix == ".ipynb" else path.read_text(encoding="utf-8")
        problems += later_imports(phase, path.relative_to(REPO_ROOT).as_posix(), source)
    assert problems == [], "\n".join(problems)
