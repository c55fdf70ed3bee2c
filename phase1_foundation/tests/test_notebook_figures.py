"""The notebooks' committed figures agree with the notebooks and the READMEs that show them.

The figures are written by `python phase1_foundation/course_map/notebook_figures.py [NOTEBOOK ...]`.
"""

import re
from pathlib import Path

import nbformat

from phase1_foundation.course_map.notebook_figures import REPO_ROOT, all_notebooks, figures_dir

PLOT_CALL = re.compile(r"plt\.show\(|plt\.plot\(|\.imshow\(|plt\.subplots\(")
MARKDOWN_IMAGE = re.compile(r"!\[.*?\]\(([^)\s]+)")  # alt text may hold brackets: MLP(2, [4, 1])
HTML_IMAGE = re.compile(r"<img\s[^>]*src=\"([^\"]+)\"")
FIGURE_NAME = re.compile(r"^(?P<stem>.+)-(?P<n>[1-9][0-9]*)\.png$")
RERUN = "run `python phase1_foundation/course_map/notebook_figures.py {}` and commit its figures/"


def readmes() -> list[Path]:
    """The root README and every top-level folder's README (the ones that show figures)."""
    return sorted([*REPO_ROOT.glob("README.md"), *REPO_ROOT.glob("*/README.md")])


def shown_images(readme: Path) -> list[str]:
    """The local image paths a README shows, as written (relative to the README)."""
    text = readme.read_text(encoding="utf-8")
    paths = MARKDOWN_IMAGE.findall(text) + HTML_IMAGE.findall(text)
    return [p for p in paths if not re.match(r"^[a-z]+://", p)]


def plots(notebook: Path) -> bool:
    """Whether any code cell calls matplotlib to draw."""
    nb = nbformat.read(notebook, as_version=4)
    return any(PLOT_CALL.search(c.source) for c in nb.cells if c.cell_type == "code")


def test_every_image_a_readme_shows_exists():
    missing = [
        f"{readme.relative_to(REPO_ROOT)} shows {path}"
        for readme in readmes()
        for path in shown_images(readme)
        if not (readme.parent / path.split("#")[0]).is_file()
    ]
    assert not missing, "README images that do not exist:\n" + "\n".join(missing)


def test_every_plotting_notebook_has_a_committed_figure():
    notebooks = all_notebooks()
    assert notebooks, "no notebooks found; the glob in notebook_figures.py is wrong"
    lacking = [
        f"{nb.relative_to(REPO_ROOT)}: " + RERUN.format(nb.relative_to(REPO_ROOT))
        for nb in notebooks
        if plots(nb) and not (figures_dir(nb) / f"{nb.stem}-1.png").is_file()
    ]
    assert not lacking, "plotting notebooks without a committed figure:\n" + "\n".join(lacking)


def test_no_figure_outlives_its_notebook():
    folders = {figures_dir(nb) for nb in all_notebooks()} | set(REPO_ROOT.glob("*/notebooks/figures"))
    orphans = []
    for folder in sorted(folders):
        for png in sorted(folder.glob("*.png")):
            match = FIGURE_NAME.match(png.name)
            if not match or not (folder.parent / f"{match['stem']}.ipynb").is_file():
                orphans.append(str(png.relative_to(REPO_ROOT)))
    assert not orphans, "figures whose notebook does not exist (delete them):\n" + "\n".join(orphans)


def test_each_notebook_with_figures_has_one_shown_in_its_readme():
    unshown = []
    for nb in all_notebooks():
        figures = {p.resolve() for p in figures_dir(nb).glob(f"{nb.stem}-*.png")}
        if not figures:
            continue
        readme = nb.parent.parent / "README.md"
        shown = {(readme.parent / p).resolve() for p in shown_images(readme)} if readme.is_file() else set()
        if not figures & shown:
            where = readme.relative_to(REPO_ROOT)
            unshown.append(f"{nb.relative_to(REPO_ROOT)}: show one of its figures in {where}")
    assert not unshown, "notebooks whose figures no README shows:\n" + "\n".join(unshown)
