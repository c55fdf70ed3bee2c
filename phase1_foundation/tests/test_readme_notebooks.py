"""What the READMEs say about the notebooks is true: every notebook a Markdown file names exists, every
notebook of a phase is listed in that phase's README, and every "the N notebooks" count is the real count.
"""

import os
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PHASES = [
    "phase1_foundation",
    "phase2_architecture",
    "phase3_components",
    "phase4_training",
    "phase5_production",
]
NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NOTEBOOK_NAME = re.compile(r"(?<![\w.])([\w.]*\w\.ipynb)")
COUNT = re.compile(r"\bthe (\w+) notebooks\b", re.IGNORECASE)


def markdown_files() -> list[Path]:
    found = []
    for folder, subfolders, names in os.walk(REPO_ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in {"runs", "__pycache__"}]
        found += [Path(folder) / n for n in names if n.endswith(".md")]
    return sorted(found)


def all_notebook_names() -> set[str]:
    return {p.name for phase in PHASES for p in (REPO_ROOT / phase / "notebooks").glob("*.ipynb")} | {
        p.name for p in (REPO_ROOT / "sparse_moe_transformer").rglob("*.ipynb")
    }


def count_problems(text: str, actual: int, where: str) -> list[str]:
    """Each 'the N notebooks' in `text` whose N (a word or digits) differs from `actual`."""
    problems = []
    for word in COUNT.findall(text):
        n = int(word) if word.isdigit() else NUMBER_WORDS.get(word.lower())
        if n is not None and n != actual:
            problems.append(f"{where} says 'the {word} notebooks'; there are {actual}")
    return problems


def test_the_count_checker_reads_words_and_digits():
    assert count_problems("run the three notebooks", 4, "X") == ["X says 'the three notebooks'; there are 4"]
    assert count_problems("tests + the 4 notebooks; read the notebooks", 4, "X") == []


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_notebook_named_in_markdown_exists(path):
    names = set(NOTEBOOK_NAME.findall(path.read_text(encoding="utf-8")))
    missing = sorted(names - all_notebook_names())
    assert missing == [], f"{path.relative_to(REPO_ROOT)} names notebooks that do not exist: {missing}"


@pytest.mark.parametrize("phase", PHASES)
def test_phase_readme_lists_every_notebook_and_counts_them_right(phase):
    readme = (REPO_ROOT / phase / "README.md").read_text(encoding="utf-8")
    notebooks = sorted(p.name for p in (REPO_ROOT / phase / "notebooks").glob("*.ipynb"))
    assert notebooks, phase
    unlisted = [n for n in notebooks if f"notebooks/{n}" not in readme]
    assert unlisted == [], f"{phase}/README.md does not list {unlisted}"
    assert count_problems(readme, len(notebooks), f"{phase}/README.md") == []


def test_root_readme_counts_are_true():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    total = sum(len(list((REPO_ROOT / phase / "notebooks").glob("*.ipynb"))) for phase in PHASES)
    assert count_problems(readme, total, "README.md") == []
