"""Write the learner's package of stubs, and the solved copy the suite checks it against.

    python -m phase1_foundation.exercise_runner.stubs   # (re)write each phase's exercises/ from the registry:
                                                        # overwrites your work

Each stub has the reference's signature and docstring and raises NotImplementedError. The solved copy
(`write_solved_package`) is the same package with each stub replaced by the reference's own source.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

from phase1_foundation.exercise_runner.registry import EXERCISES, learner_location, split_target

HEADER = '''"""Your code for `{path}`.

Exercises: {names}.
Each function below raises NotImplementedError until you write it.
Check yours with `python -m phase1_foundation.exercise_runner run {first}`
(each exercise's name works).
The course's version is `{path}`: read it after you have tried.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
'''


def module_targets() -> dict[str, list[tuple[str, str]]]:
    """{reference module: [(target, exercise name), ...]} in registry order."""
    grouped = defaultdict(list)
    for exercise in EXERCISES:
        for target in exercise.targets:
            grouped[split_target(target)[0]].append((target, exercise.name))
    return dict(grouped)


def _reference(target: str):
    module, qualname = split_target(target)
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


HEADER_NAMES = {"math", "np", "torch", "F", "nn"}


def _needed_names(target: str) -> set[str]:
    """Names the def needs besides the header's: in its defaults, decorators and annotations."""
    node = ast.parse(textwrap.dedent(inspect.getsource(_reference(target)))).body[0]
    arguments = [
        *node.args.posonlyargs,
        *node.args.args,
        *node.args.kwonlyargs,
        node.args.vararg,
        node.args.kwarg,
    ]
    exprs = [*node.args.defaults, *[d for d in node.args.kw_defaults if d is not None], *node.decorator_list]
    exprs += [a.annotation for a in arguments if a is not None and a.annotation is not None]
    exprs += [node.returns] if node.returns is not None else []
    names = {n.id for e in exprs for n in ast.walk(e) if isinstance(n, ast.Name)}
    return {n for n in names if n not in HEADER_NAMES and not hasattr(builtins, n)}


def _import_lines(module: str, names: set[str]) -> list[str]:
    """`from X import name` for each name, X being where the reference module got it from."""
    reference = importlib.import_module(module)
    by_source = defaultdict(list)
    for name in sorted(names):
        source = getattr(getattr(reference, name), "__module__", None) or module
        by_source[source if source not in ("builtins",) else module].append(name)
    return [f"from {source} import {', '.join(found)}" for source, found in sorted(by_source.items())]


def _stub_def(target: str, exercise: str) -> str:
    """The reference's def (decorators, signature, docstring) with a body that raises."""
    source = textwrap.dedent(inspect.getsource(_reference(target)))
    node = ast.parse(source).body[0]
    qualname = split_target(target)[1]
    message = f"{qualname} is yours to write (exercise {exercise})"
    body = [ast.Expr(ast.Constant(ast.get_docstring(node, clean=True)))] if ast.get_docstring(node) else []
    node.body = body + [ast.Raise(ast.Call(ast.Name("NotImplementedError"), [ast.Constant(message)], []))]
    return ast.unparse(node)


def stub_module_source(module: str, targets: list[tuple[str, str]]) -> str:
    names = list(dict.fromkeys(name for _, name in targets))
    path = module.replace(".", "/") + ".py"
    header = HEADER.format(path=path, names=", ".join(names), first=names[0])
    # the classes whose methods you write (you build and read their objects), and the names their
    # signatures use
    needed = {split_target(t)[1].split(".")[0] for t, _ in targets if "." in split_target(t)[1]}
    needed |= {name for t, _ in targets for name in _needed_names(t)}
    if needed:
        header += "\n" + "\n".join(_import_lines(module, needed)) + "\n"
    parts = [header]
    classes = defaultdict(list)
    for target, exercise in targets:
        qualname = split_target(target)[1]
        if "." in qualname:
            classes[qualname.split(".")[0]].append((target, exercise))
        else:
            parts.append(_stub_def(target, exercise))
    for cls, methods in classes.items():
        doc = f'"""Methods of `{cls}`: `self` is a {cls} (its __init__ sets what you read)."""'
        defs = "\n\n".join(textwrap.indent(_stub_def(t, e), "    ") for t, e in methods)
        parts.append(f"class {cls}Methods:\n    {doc}\n\n{defs}")
    return "\n\n\n".join(parts) + "\n"


def write_stub_package(root: Path, package: str = "", format_code: bool = True) -> list[Path]:
    """Write `root/[package/]PHASE/exercises/` (stubs for every exercise); returns the files written."""
    written = []
    for module, targets in module_targets().items():
        learner_module = learner_location(targets[0][0], package)[0]
        path = root / Path(*learner_module.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(stub_module_source(module, targets), encoding="utf-8")
        written.append(path)
    # every package folder between root and a stub (a phase's own __init__.py already exists)
    for folder in {parent for p in written for parent in p.relative_to(root).parents if parent.parts}:
        init = root / folder / "__init__.py"
        if not init.exists():
            init.write_text('"""Your code for the exercises (see the root README)."""\n', encoding="utf-8")
            written.append(init)
    if format_code:
        subprocess.run([sys.executable, "-m", "ruff", "format", "-q", *map(str, written)], check=False)
    return written


def _find_def(tree: ast.Module, qualname: str) -> ast.FunctionDef:
    if "." in qualname:
        cls, method = qualname.split(".")
        holder = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == f"{cls}Methods")
        return next(n for n in holder.body if isinstance(n, ast.FunctionDef) and n.name == method)
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == qualname)


def replace_defs(stub_source: str, replacements: dict[str, str]) -> str:
    """`stub_source` with the def of each qualname (`f`, or `C.m` in `CMethods`) replaced by a source."""
    lines = stub_source.splitlines()
    tree = ast.parse(stub_source)
    spans = []
    for qualname, source in replacements.items():
        node = _find_def(tree, qualname)
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        indented = textwrap.indent(textwrap.dedent(source), " " * node.col_offset)
        spans.append((start, node.end_lineno, indented.rstrip("\n").splitlines()))
    for start, end, replacement in sorted(spans, reverse=True):
        lines[start:end] = replacement
    return "\n".join(lines) + "\n"


def solved_module_source(stub_source: str, module: str, targets: list[str]) -> str:
    """`stub_source` with every target's stub replaced by the reference's source, and the reference
    module's names (its imports and helpers) made available to that source."""
    replacements = {split_target(t)[1]: inspect.getsource(_reference(t)) for t in targets}
    lines = replace_defs(stub_source, replacements).splitlines()
    tree = ast.parse(stub_source)  # the header (imports) is the same before and after
    last_import = max(n.end_lineno for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom))
    helpers = (
        f"globals().update({{k: v for k, v in vars(importlib.import_module({module!r})).items() "
        f"if not k.startswith('__')}})"
    )
    lines[last_import:last_import] = ["import importlib", helpers]
    return "\n".join(lines) + "\n"


def write_solved_package(stub_root: Path, out_root: Path, stub_package: str, package: str) -> None:
    """Copy the stub package at `stub_root/stub_package` to `out_root/package`, solved."""
    for module, targets in module_targets().items():
        stub_module = learner_location(targets[0][0], stub_package)[0]
        solved_module = learner_location(targets[0][0], package)[0]
        source = (stub_root / Path(*stub_module.split(".")).with_suffix(".py")).read_text(encoding="utf-8")
        path = out_root / Path(*solved_module.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(solved_module_source(source, module, [t for t, _ in targets]), encoding="utf-8")
    for init in (stub_root / stub_package).rglob("__init__.py"):
        target = out_root / package / init.relative_to(stub_root / stub_package)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(init.read_text(encoding="utf-8"), encoding="utf-8")


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[2]
    for path in write_stub_package(root, sys.argv[1] if len(sys.argv) > 1 else ""):
        print(path.relative_to(root))
