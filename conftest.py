"""Shared pytest set-up for the whole repository.

Plots render off-screen and PyTorch uses the cores the machine has; nothing here
changes what a test checks.
"""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
# Tests must never reach the network: make the Hugging Face libraries fail fast offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
