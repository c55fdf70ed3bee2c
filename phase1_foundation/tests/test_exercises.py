"""The exercises check the learner's code, not the course's.

With the switch on (LLM_EXERCISES=all) every exercise test fails with NotImplementedError on freshly
written stubs, and passes when the stubs hold the reference's own source: so each test reaches the
learner's version of its piece, and the stubs are complete enough for the reference to drop in.
"""

import inspect
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from phase1_foundation.exercise_runner.registry import (
    BY_NAME,
    EXERCISES,
    learner_location,
    matches_test_id,
    split_target,
)
from phase1_foundation.exercise_runner.stubs import write_solved_package, write_stub_package
from phase1_foundation.exercise_runner.switch import REPO_ROOT, resolve, swapped

TEST_FILES = list(dict.fromkeys(t.split("::")[0] for e in EXERCISES for t in e.tests))


def run_exercise_tests(pythonpath: Path, package: str, junit: Path, *options: str) -> dict[str, str]:
    """Run every exercise's tests against `package` in a subprocess: {node id: failure message or ''}."""
    env = {
        **os.environ,
        "LLM_EXERCISES": "all",
        "LLM_LEARNER": package,
        "PYTHONPATH": os.pathsep.join([str(pythonpath), str(REPO_ROOT)]),
    }
    command = [
        sys.executable,
        "-m",
        "pytest",
        *TEST_FILES,
        "-q",
        "-p",
        "no:cacheprovider",
        "--tb=line",
        *options,
    ]
    subprocess.run(
        [*command, f"--junitxml={junit}"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=600
    )
    results = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        path = case.get("classname").replace(".", "/") + ".py"
        problems = [e for e in case if e.tag in ("failure", "error")]
        message = (problems[0].get("message") or problems[0].tag) if problems else ""
        results[f"{path}::{case.get('name')}"] = message
    return results


def test_every_target_exists_and_the_committed_stubs_have_its_signature():
    assert (
        len(EXERCISES) >= 20
        and len({split_target(t)[0].split(".")[0] for e in EXERCISES for t in e.targets}) == 5
    )
    for exercise in EXERCISES:
        for target in exercise.targets:
            reference = resolve(*split_target(target))
            mine = resolve(*learner_location(target))
            assert inspect.signature(mine) == inspect.signature(reference), target


def test_swapping_reaches_internal_callers_and_is_undone():
    # both exercises are Phase 1's: a phase's tests import no later phase (test_course_order.py)
    from phase1_foundation.src.attention_mechanism import MultiHeadAttention
    from phase1_foundation.src.autograd_engine import Value

    x = torch.randn(2, 3, 8)
    attention, a, b = MultiHeadAttention(8, 2), Value(2.0), Value(3.0)
    with swapped([BY_NAME["attention"], BY_NAME["value_ops"]]):
        with pytest.raises(NotImplementedError, match="scaled_dot_product_attention is yours to write"):
            attention(x)  # the module calls the function it imported: it reaches the stub
        with pytest.raises(NotImplementedError, match="Value.__add__ is yours to write"):
            a + b  # a method target is set on the course's class
    assert attention(x)[0].shape == (2, 3, 8) and (a + b).data == 5.0


def test_the_test_selector_handles_parametrized_ids():
    assert matches_test_id("a.py::t", "a.py::t[1-2]") and matches_test_id("a.py::t", "a.py::t")
    assert not matches_test_id("a.py::t", "a.py::t_other")
    assert matches_test_id("a.py::t[Adam*", "a.py::t[AdamW-x]") and not matches_test_id(
        "a.py::t[Adam*", "a.py::t[SGD]"
    )


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("exercises")
    write_stub_package(root, "learner_stubs", format_code=False)
    write_solved_package(root, root, "learner_stubs", "learner_solved")
    return root


def test_on_untouched_stubs_every_exercise_test_fails_with_not_implemented(packages):
    results = run_exercise_tests(packages, "learner_stubs", packages / "stubs.xml")
    for exercise in EXERCISES:
        for pattern in exercise.tests:
            assert any(matches_test_id(pattern, nodeid) for nodeid in results), f"{pattern} selects no test"
    wrong = {nodeid: message for nodeid, message in results.items() if "NotImplementedError" not in message}
    assert wrong == {}, "these exercise tests did not fail with NotImplementedError"


def test_with_the_reference_copied_into_the_stubs_every_exercise_test_passes(packages):
    results = run_exercise_tests(packages, "learner_solved", packages / "solved.xml", "-x")
    failed = {nodeid: message for nodeid, message in results.items() if message}
    assert failed == {} and len(results) >= sum(len(e.tests) for e in EXERCISES)


def test_the_root_readme_lists_every_exercise():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert [e.name for e in EXERCISES if f"| `{e.name}` |" not in readme] == []
