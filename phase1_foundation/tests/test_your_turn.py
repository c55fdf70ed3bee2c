"""Every "Your turn" cell's folded solution passes its exercise's tests.

A notebook's "### Your turn: `NAME`" Markdown cell folds a solution in `<details>`. Here each solution is
put into a fresh copy of the stubs (a function replaces the stub of the same name; a method, the stub
in `<Class>Methods`), using only what the stub file imports, and the exercise's tests run against it.
"""

import ast
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat

from phase1_foundation.exercise_runner.registry import BY_NAME, learner_location, split_target
from phase1_foundation.exercise_runner.stubs import replace_defs, write_stub_package
from phase1_foundation.exercise_runner.switch import REPO_ROOT

HEADING = re.compile(r"^### Your turn: `(\w+)`", re.MULTILINE)
SOLUTION = re.compile(r"<details>.*?```python\n(.*?)```.*?</details>", re.DOTALL)


def your_turn_solutions() -> dict[str, str]:
    """{exercise name: solution source} from every course notebook."""
    found = {}
    for path in sorted(REPO_ROOT.glob("phase*/notebooks/*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            heading = HEADING.search(cell.source) if cell.cell_type == "markdown" else None
            if heading:
                solution = SOLUTION.search(cell.source)
                assert solution, f"{path.name}: 'Your turn: {heading.group(1)}' has no folded python solution"
                assert heading.group(1) not in found, f"two 'Your turn' cells for {heading.group(1)}"
                found[heading.group(1)] = solution.group(1)
    return found


def split_solution(name: str, source: str) -> dict[str, str]:
    """{target qualname: the solution's def of it} for every target of exercise `name`."""
    defs = {node.name: ast.get_source_segment(source, node) for node in ast.parse(source).body}
    wanted = {split_target(t)[1]: split_target(t)[1].split(".")[-1] for t in BY_NAME[name].targets}
    missing = sorted(set(wanted.values()) - set(defs))
    assert missing == [], f"the solution of {name} does not define {missing}"
    return {qualname: defs[short] for qualname, short in wanted.items()}


def test_the_notebooks_hold_solutions_for_at_least_twelve_exercises():
    solutions = your_turn_solutions()
    assert len(solutions) >= 12 and set(solutions) <= set(BY_NAME)


def test_every_folded_solution_passes_its_exercise_tests(tmp_path):
    solutions = your_turn_solutions()
    write_stub_package(tmp_path, "learner_your_turn", format_code=False)
    by_file = {}
    for name, source in solutions.items():
        for qualname, code in split_solution(name, source).items():
            module = learner_location(BY_NAME[name].targets[0], "learner_your_turn")[0]
            by_file.setdefault(tmp_path / Path(*module.split(".")).with_suffix(".py"), {})[qualname] = code
    for path, replacements in by_file.items():
        path.write_text(replace_defs(path.read_text(encoding="utf-8"), replacements), encoding="utf-8")
    files = list(dict.fromkeys(t.split("::")[0] for n in solutions for t in BY_NAME[n].tests))
    env = {
        **os.environ,
        "LLM_EXERCISES": ",".join(solutions),
        "LLM_LEARNER": "learner_your_turn",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)]),
    }
    junit = tmp_path / "your_turn.xml"
    command = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "--tb=line"]
    subprocess.run(
        [*command, f"--junitxml={junit}"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=600
    )
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    failed = {
        c.get("name"): c[0].get("message") for c in cases if len(c) and c[0].tag in ("failure", "error")
    }
    assert failed == {}, "these solutions fail their exercise's tests"
    assert len(cases) >= sum(len(BY_NAME[n].tests) for n in solutions)
