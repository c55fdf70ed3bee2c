"""The course map cannot drift from the notebooks.

The map (`phase1_foundation/course_map/course_map.svg`, drawn by `course_map.py` beside it) is the
graph of the links each notebook opens with ("**Prerequisites:**"). These tests rebuild that graph
from the notebooks and check: the numbering is N.M within phase N with no gaps; a lesson's
prerequisites come before it (no order inversion); each "**Next:**" link leads to the following
lesson; every course module a notebook imports is taught by that lesson or one of its prerequisites,
directly or through theirs; and the committed DOT file and SVG drawing hold exactly the rebuilt graph.
"""

import ast
import importlib.util
import re
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[2]
MAP = REPO_ROOT / "phase1_foundation" / "course_map"
_spec = importlib.util.spec_from_file_location("course_map", MAP / "course_map.py")
course_map = importlib.util.module_from_spec(_spec)
DRAW = "phase1_foundation/course_map/course_map.py"
_spec.loader.exec_module(course_map)


def lesson_key(lesson: str) -> tuple[int, int]:
    phase, number = lesson.split(".")
    return int(phase), int(number)


def order_problems(graph: dict[str, list[str]]) -> list[str]:
    """Prerequisites that are not strictly earlier lessons (an order inversion), or unknown lessons."""
    problems = []
    for lesson, prerequisites in graph.items():
        for before in prerequisites:
            if before not in graph:
                problems.append(f"{lesson} needs {before}, which is no lesson")
            elif lesson_key(before) >= lesson_key(lesson):
                problems.append(f"{lesson} needs {before}, which comes later in the numbering")
    return problems


def ancestors(graph: dict[str, list[str]], lesson: str) -> set[str]:
    seen, todo = set(), list(graph[lesson])
    while todo:
        before = todo.pop()
        if before not in seen:
            seen.add(before)
            todo += graph.get(before, [])
    return seen


def imported_course_modules(path: Path) -> set[str]:
    """Every `phaseN_*.src.module` a notebook's code cells import."""
    cells = nbformat.read(path, as_version=4).cells
    lines = [
        line
        for cell in cells
        if cell.cell_type == "code"
        for line in cell.source.splitlines()
        if not line.lstrip().startswith(("%", "!"))
    ]
    modules = set()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
    return {m for m in modules if m.split(".")[0] in course_map.PHASES}


def import_problems(graph: dict[str, list[str]], imports: dict[str, set[str]]) -> list[str]:
    """Imports of a module taught by a lesson that is neither this one nor among its prerequisites."""
    problems = []
    for lesson, modules in imports.items():
        allowed = ancestors(graph, lesson) | {lesson}
        for module in sorted(modules):
            teacher = course_map.TEACHES.get(module)
            if teacher is not None and teacher not in allowed:
                problems.append(
                    f"{lesson} imports {module}, taught in {teacher}: not among its prerequisites"
                )
    return problems


def test_the_checkers_catch_an_inversion_and_an_untaught_import():
    graph = {"1.1": [], "1.2": ["1.1"], "2.1": ["1.2", "2.2"], "2.2": []}
    assert order_problems(graph) == ["2.1 needs 2.2, which comes later in the numbering"]
    assert order_problems({"1.1": ["1.5"]}) == ["1.1 needs 1.5, which is no lesson"]
    assert ancestors(graph, "2.1") == {"1.1", "1.2", "2.2"}
    attention = "phase1_foundation.src.attention_mechanism"  # taught in 1.5
    assert import_problems({"1.5": [], "2.1": ["1.5"]}, {"2.1": {attention}}) == []
    assert import_problems({"1.5": [], "2.1": []}, {"2.1": {attention}}) == [
        f"2.1 imports {attention}, taught in 1.5: not among its prerequisites"
    ]


def test_notebooks_are_numbered_in_each_phase_without_gaps():
    by_phase = {}
    for path in course_map.course_notebooks():
        by_phase.setdefault(path.parts[-3], []).append(course_map.lesson_id(path))
    assert list(by_phase) == list(course_map.PHASES)
    for rank, (phase, lessons) in enumerate(by_phase.items(), start=1):
        assert lessons == [f"{rank}.{m}" for m in range(1, len(lessons) + 1)], (phase, lessons)


def test_prerequisites_come_earlier_and_next_leads_to_the_following_lesson():
    graph = course_map.prerequisite_graph()
    assert order_problems(graph) == []
    notebooks = course_map.course_notebooks()
    final = (REPO_ROOT / course_map.FINAL_NEXT).resolve()
    for path, following in zip(notebooks, [*notebooks[1:], None]):
        _, next_link = course_map.navigation(path)
        expected = following.resolve() if following is not None else final
        assert next_link == expected, f"{path.name}: Next links {next_link}, expected {expected}"
    assert final.is_file()


def test_every_lesson_but_the_first_has_a_prerequisite():
    graph = course_map.prerequisite_graph()
    assert graph["1.1"] == []
    assert [lesson for lesson, before in graph.items() if lesson != "1.1" and not before] == []


def test_imported_modules_are_taught_by_the_lesson_or_its_prerequisites():
    graph = course_map.prerequisite_graph()
    notebooks = {course_map.lesson_id(p): p for p in course_map.course_notebooks()}
    imports = {lesson: imported_course_modules(path) for lesson, path in notebooks.items()}
    assert import_problems(graph, imports) == []
    for module, teacher in course_map.TEACHES.items():
        assert module in imports[teacher], f"{teacher} is said to teach {module} but does not import it"
        assert (REPO_ROOT / (module.replace(".", "/") + ".py")).is_file(), module


def test_the_committed_map_is_the_graph_of_the_notebooks():
    dot = (MAP / "course_map.dot").read_text(encoding="utf-8")
    assert dot == course_map.dot_source(), f"the map drifted: run `python {DRAW}` and commit"
    graph = course_map.prerequisite_graph()
    edges = {(before, lesson) for lesson, prerequisites in graph.items() for before in prerequisites}
    svg = (MAP / "course_map.svg").read_text(encoding="utf-8")
    assert course_map.svg_edges(svg) == edges, f"the drawing is stale: run `python {DRAW}`"
    drawn_nodes = set(re.findall(r'<g id="node\d+" class="node">\s*<title>(.*?)</title>', svg))
    assert drawn_nodes == set(graph)


def test_the_root_readme_shows_the_map_and_starts_at_lesson_one():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert "phase1_foundation/course_map/course_map.svg" in readme
    assert "phase1_foundation/notebooks/1.1_backprop.ipynb" in readme
