"""The house rules a newcomer relies on, checked on the source itself.

- train.py holds the model and its training loop and nothing else: under 900 lines, written in build-up
  order (every name this file defines is defined above its first use, annotations included), and
  importing it loads no command-line, plotting or run-resolution module.
- No function in any src/ folder of the repository is 80 lines or longer.
"""

import ast
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_PY = REPO_ROOT / "sparse_moe_transformer" / "src" / "train.py"
MAX_FUNCTION_LINES = 80


def top_level_definitions(tree: ast.Module) -> dict[str, int]:
    """name -> line of every class, function and assignment at module level."""
    defined = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.setdefault(node.name, node.lineno)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defined.setdefault(name.id, node.lineno)
    return defined


def names_used_before_defined(source: str) -> list[str]:
    """'name (line used < line defined)' for each use of a module-level name above its definition,
    in code and in annotations (string annotations are parsed too)."""
    tree = ast.parse(source)
    defined = top_level_definitions(tree)
    problems = set()

    def check(node: ast.AST, line: int) -> None:
        for name in ast.walk(node):
            if isinstance(name, ast.Name) and name.id in defined and defined[name.id] > line:
                problems.add(f"{name.id} (used on line {line}, defined on line {defined[name.id]})")

    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            check(node, node.lineno)
        annotation = getattr(node, "annotation", None) or getattr(node, "returns", None)
        if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
            check(ast.parse(annotation.value, mode="eval"), node.lineno)
    return sorted(problems)


def test_the_reading_order_checker_finds_a_forward_use():
    source = (
        "def a():\n    return b()\n\ndef b():\n    return 1\n\nX: 'Later' = 1\n\nclass Later:\n    pass\n"
    )
    assert names_used_before_defined(source) == [
        "Later (used on line 7, defined on line 9)",
        "b (used on line 2, defined on line 4)",
    ]
    assert names_used_before_defined("def b():\n    return 1\n\ndef a():\n    return b()\n") == []


def test_train_py_reads_top_to_bottom():
    assert names_used_before_defined(TRAIN_PY.read_text()) == []


def test_train_py_is_the_model_and_the_loop_only():
    lines = TRAIN_PY.read_text().count("\n")
    assert lines < 900, (
        f"train.py has {lines} lines: move what is not the model or the loop to a module of its own"
    )
    names = set(top_level_definitions(ast.parse(TRAIN_PY.read_text())))
    for name in ("Config", "SparseMoEFFN", "SparseMoETransformerLayer", "SparseMoETransformer", "moe_losses"):
        assert name in names
    for name in ("train_step", "evaluate", "train"):
        assert name in names
    for elsewhere in ("setup_runtime", "resolve_run", "count_parameters", "build_parser", "make_plots"):
        assert elsewhere not in names, f"{elsewhere} belongs in its own module, not in train.py"


def test_importing_train_py_loads_no_command_line_or_plotting_module():
    modules = ("cli", "training_plots", "run_config", "benchmark_mode")
    ours = [f"sparse_moe_transformer.src.{name}" for name in modules]
    code = (
        "import sys, sparse_moe_transformer.src.train\n"
        f"loaded = [m for m in sys.modules if m.startswith('matplotlib') or m in {ours!r}]\n"
        "print(sorted(set(m.split('.')[0] if m.startswith('matplotlib') else m for m in loaded)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def long_functions(source: str, where: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length >= MAX_FUNCTION_LINES:
                found.append(f"{where}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_the_length_checker_counts_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def f():\n{body}\n", "a.py") == [f"a.py:1 f ({MAX_FUNCTION_LINES + 1} lines)"]
    assert long_functions("def f():\n    return 1\n", "a.py") == []


def test_no_function_in_any_src_folder_reaches_80_lines():
    found = []
    for path in sorted(REPO_ROOT.glob("*/src/**/*.py")):
        found += long_functions(path.read_text(), str(path.relative_to(REPO_ROOT)))
    assert found == [], "split these into named steps: " + "; ".join(found)
