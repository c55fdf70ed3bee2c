"""phase1_foundation package."""
