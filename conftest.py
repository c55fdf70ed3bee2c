"""Shared pytest set-up for the whole repository.

Plots render off-screen and PyTorch uses the cores the machine has; nothing here
changes what a test checks.
"""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
# One math thread per process (notebook kernels and subprocesses inherit it). On a 2-core machine
# running tests beside other work, PyTorch's default thread pool spins and makes tiny models 10-50x
# slower; one thread per process is fast and predictable. Set OMP_NUM_THREADS yourself to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
# Tests must never reach the network: make the Hugging Face libraries fail fast offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Exercises: LLM_EXERCISES=all (or names) runs the exercises' tests against the learner's stubs
# instead of the course's code (see phase1_foundation/exercise_runner/plugin.py and the root README).
if os.environ.get("LLM_EXERCISES"):
    pytest_plugins = ["phase1_foundation.exercise_runner.plugin"]
