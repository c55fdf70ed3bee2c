"""Your code for the exercises (see the root README)."""
