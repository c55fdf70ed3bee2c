"""The notebooks' figures as committed images, so a reader sees them without running anything.

Notebooks are committed without outputs. This script executes each one (kernel python3, in the
notebook's folder) and writes every image/png output it produces to
`<folder>/figures/<notebook stem>-<n>.png` (n = 1, 2, ... in output order), deleting that notebook's
stale figures first. The READMEs show these images.

    python phase1_foundation/course_map/notebook_figures.py                  # every notebook
    python phase1_foundation/course_map/notebook_figures.py path/to/nb.ipynb # just these

`phase1_foundation/tests/test_notebook_figures.py` fails when a README shows a missing image, when a
plotting notebook has no committed figure, or when a figure's notebook is gone.
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_GLOBS = ("phase*/notebooks/*.ipynb", "sparse_moe_transformer/notebooks/*.ipynb")


def all_notebooks() -> list[Path]:
    """Every course and production notebook, in path order."""
    return sorted(p for pattern in NOTEBOOK_GLOBS for p in REPO_ROOT.glob(pattern))


def figures_dir(notebook: Path) -> Path:
    """The folder the notebook's figures live in: `figures/` beside the notebook."""
    return notebook.parent / "figures"


def figure_name(notebook: Path, n: int) -> str:
    """The file name of the notebook's n-th figure (n counts from 1)."""
    return f"{notebook.stem}-{n}.png"


def png_outputs(nb: nbformat.NotebookNode) -> list[bytes]:
    """The PNG bytes of every image/png output, in cell and output order."""
    images = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                images.append(base64.b64decode(data["image/png"]))
    return images


def execute(notebook: Path) -> nbformat.NotebookNode:
    """Run the notebook top to bottom in its own folder and return it with outputs."""
    nb = nbformat.read(notebook, as_version=4)
    # The test suite's conftest forces the Agg backend, which draws no output; the kernel must use the
    # inline backend so plt.show() becomes an image/png output.
    os.environ.pop("MPLBACKEND", None)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    pythonpath = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in pythonpath.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), pythonpath) if p)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}
    )
    client.execute()
    return nb


def write_figures(notebook: Path) -> list[Path]:
    """Execute the notebook and replace its committed figures with the ones it draws now."""
    images = png_outputs(execute(notebook))
    out = figures_dir(notebook)
    for stale in out.glob(f"{notebook.stem}-*.png"):
        stale.unlink()
    written = []
    for n, png in enumerate(images, start=1):
        out.mkdir(exist_ok=True)
        path = out / figure_name(notebook, n)
        path.write_bytes(png)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    notebooks = [Path(a).resolve() for a in argv] or all_notebooks()
    for notebook in notebooks:
        if notebook.suffix != ".ipynb" or not notebook.is_file():
            print(f"error: {notebook} is not a notebook file; pass paths to .ipynb files", file=sys.stderr)
            return 2
    for notebook in notebooks:
        written = write_figures(notebook)
        print(f"{notebook.relative_to(REPO_ROOT)}: {len(written)} figure(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
