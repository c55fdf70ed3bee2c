"""python -m phase1_foundation.exercise_runner list | run NAME [NAME ...] [-- pytest options] | run all"""

from __future__ import annotations

import os
import subprocess
import sys

from phase1_foundation.exercise_runner.registry import EXERCISES, selected
from phase1_foundation.exercise_runner.switch import REPO_ROOT


def test_files(names: str) -> list[str]:
    return list(dict.fromkeys(t.split("::")[0] for e in selected(names) for t in e.tests))


def run(names: str, pytest_args: list[str]) -> int:
    """Run the tests of the exercises `names` ('all' or comma-separated) against the learner's code."""
    env = {**os.environ, "LLM_EXERCISES": names}
    command = [
        sys.executable,
        "-m",
        "pytest",
        *test_files(names),
        "-q",
        "-p",
        "no:cacheprovider",
        *pytest_args,
    ]
    return subprocess.run(command, cwd=REPO_ROOT, env=env).returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("list", "run"):
        print(__doc__)
        return 2
    if argv[0] == "list":
        width = max(len(e.name) for e in EXERCISES)
        for e in EXERCISES:
            print(f"{e.name:<{width}}  {e.what}")
        return 0
    names = [a for a in argv[1:] if not a.startswith("-")] or ["all"]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    return run(",".join(names), extra)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
