"""Every notebook in the repository is valid, uses the python3 kernel, and is committed without outputs.

(Executing the notebooks is nbmake's job: `python -m pytest` runs each one.)
"""

import os
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


# Folders that are not the repository's own content: hidden folders (.git, .venv,
# .ipynb_checkpoints, ...), virtual environments and build/run outputs.
SKIP_DIRS = {"venv", "env", "build", "dist", "node_modules", "__pycache__", "runs", "out"}


def repository_notebooks() -> list[Path]:
    notebooks = []
    for folder, subfolders, files in os.walk(REPO_ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in SKIP_DIRS]
        notebooks += [Path(folder) / f for f in files if f.endswith(".ipynb")]
    return sorted(notebooks)


def test_repository_root_is_found_and_has_notebooks():
    assert (REPO_ROOT / "pyproject.toml").is_file()
    assert (REPO_ROOT / "phase1_foundation" / "notebooks" / "1.1_backprop.ipynb") in repository_notebooks()


@pytest.mark.parametrize("path", repository_notebooks(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_notebook_is_valid_clean_and_python3(path):
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    assert nb.nbformat == 4, f"{path}: nbformat {nb.nbformat}, expected 4"
    nbformat.validate(nb)  # raises ValidationError on a malformed notebook
    kernelspec = nb.metadata.get("kernelspec", {})
    assert kernelspec.get("name") == "python3", f"{path}: kernelspec {kernelspec!r}, expected name 'python3'"
    assert kernelspec.get("language", "python") == "python"
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells, f"{path}: no code cells"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.get("outputs") == [], f"{path}: cell {i} has stored outputs; clear them before committing"
        assert cell.get("execution_count") is None, f"{path}: cell {i} has an execution count; clear outputs"
