"""The pytest side of the switch, loaded by the root conftest when LLM_EXERCISES is set.

    LLM_EXERCISES=layernorm,rope python -m pytest phase2_architecture     # or LLM_EXERCISES=all
    LLM_LEARNER=my_package ...           # default: each phase's exercises/ (my_package/PHASE/exercises/)

Only the tests of the named exercises run (the others are deselected), and each runs against the
learner's version of its own exercise's functions; everything else stays the course's reference code,
so the exercises can be done in any order.
"""

from __future__ import annotations

import os

import pytest

from phase1_foundation.exercise_runner.registry import matches_test_id, selected
from phase1_foundation.exercise_runner.switch import swapped

_EXERCISES = selected(os.environ.get("LLM_EXERCISES", "all"))
_PACKAGE = os.environ.get("LLM_LEARNER", "")


def owners(nodeid: str) -> list:
    return [e for e in _EXERCISES if any(matches_test_id(t, nodeid) for t in e.tests)]


def pytest_report_header(config):
    names = ", ".join(e.name for e in _EXERCISES)
    where = f"the package {_PACKAGE!r}" if _PACKAGE else "each phase's exercises/"
    return f"exercises against {where}: {names}"


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if owners(item.nodeid)]
    dropped = [item for item in items if not owners(item.nodeid)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


@pytest.fixture(autouse=True)
def _learner_code(request):
    with swapped(owners(request.node.nodeid), _PACKAGE):
        yield
