"""phase4_training package."""
