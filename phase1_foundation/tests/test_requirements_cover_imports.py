"""`pip install -r requirements.txt` installs every package the repository imports.

A fresh virtual environment gets only what `requirements.txt` lists; a package that happens to be on
the developer's machine (pulled in by something else, or installed by hand) would make the suite pass
here and fail for a new user at import time. So every `import` of every Python file and notebook code
cell in the repository (parsed with `ast`, nothing is executed) is mapped to the distribution that
provides it (`importlib.metadata.packages_distributions()`), and that distribution must be named in
`requirements.txt`. The standard library and the repository's own modules are exempt.
"""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[2]
# Virtual environments and caches inside the clone hold other projects' code, not ours.
SKIPPED_DIRS = {".git", "build", "dist", "runs", "out", "data_cache", "__pycache__", "node_modules"}


def repository_files() -> list[Path]:
    """Every .py and .ipynb file of the repository, outside hidden folders, venvs and run outputs."""
    found = []
    for path in REPO_ROOT.rglob("*"):
        parts = path.relative_to(REPO_ROOT).parts
        hidden = any(p.startswith(".") or p in SKIPPED_DIRS or "venv" in p for p in parts[:-1])
        if not hidden and path.suffix in (".py", ".ipynb") and path.is_file():
            found.append(path)
    return sorted(found)


def source_of(path: Path) -> str:
    """The Python source of a file, or of a notebook's code cells (IPython magics and shell lines dropped)."""
    if path.suffix == ".py":
        return path.read_text(encoding="utf-8")
    cells = [cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
    lines = [line for cell in cells for line in cell.splitlines() if not line.lstrip().startswith(("%", "!"))]
    return "\n".join(lines)


def top_level_imports(source: str) -> set[str]:
    """The top-level module names of every absolute `import x.y` and `from x.y import z` in `source`."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def first_party_names(files: list[Path]) -> set[str]:
    """Names the repository itself provides: its top-level packages and every module's basename
    (a script run from its folder may import a sibling by its bare name)."""
    names = {p.name for p in REPO_ROOT.iterdir() if (p / "__init__.py").exists()}
    return names | {f.stem for f in files if f.suffix == ".py"}


def required_distributions(requirements: str) -> set[str]:
    """Normalised (PEP 503) distribution names listed in a requirements file; `-e .` and options skipped."""
    names = set()
    for line in requirements.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(normalise(re.split(r"[\s\[<>=!~;@]", line, maxsplit=1)[0]))
    return names


def normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def missing_requirements(imports: dict[str, set[Path]], listed: set[str]) -> list[str]:
    """One line per third-party module whose distribution `requirements.txt` does not list."""
    providers = packages_distributions()
    problems = []
    for module in sorted(imports):
        where = ", ".join(sorted(str(p.relative_to(REPO_ROOT)) for p in imports[module])[:3])
        distributions = {normalise(d) for d in providers.get(module, [])}
        if not distributions:
            problems.append(f"{module!r} (imported in {where}) is not installed by any distribution here")
        elif not distributions & listed:
            problems.append(
                f"{module!r} (imported in {where}) comes from {sorted(distributions)}, "
                "which requirements.txt does not list: add it to requirements.txt"
            )
    return problems


def test_parsers_find_imports_and_requirement_names():
    source = "import os, numpy.linalg as la\nfrom torch.nn import Linear\nfrom . import sibling\n"
    assert top_level_imports(source) == {"os", "numpy", "torch"}
    listed = required_distributions("torch==2.13.0  # cpu\nPyYAML>=6\nfoo_bar[x]>=1\n-e .\n# hypothesis\n")
    assert listed == {"torch", "pyyaml", "foo-bar"}


def test_a_module_missing_from_requirements_is_named():
    fake = {"numpy": {REPO_ROOT / "conftest.py"}}
    problems = missing_requirements(fake, listed={"torch"})
    assert len(problems) == 1 and "'numpy'" in problems[0] and "requirements.txt" in problems[0]
    assert missing_requirements(fake, listed={"numpy"}) == []


def test_requirements_txt_lists_every_imported_distribution():
    files = repository_files()
    assert any(f.suffix == ".ipynb" for f in files) and any(f.name == "conftest.py" for f in files)
    exempt = set(sys.stdlib_module_names) | first_party_names(files) | {"__future__"}
    imports: dict[str, set[Path]] = {}
    for path in files:
        for module in top_level_imports(source_of(path)) - exempt:
            imports.setdefault(module, set()).add(path)
    listed = required_distributions((REPO_ROOT / "requirements.txt").read_text(encoding="utf-8"))
    problems = missing_requirements(imports, listed)
    assert not problems, "requirements.txt misses what the repository imports:\n" + "\n".join(problems)
