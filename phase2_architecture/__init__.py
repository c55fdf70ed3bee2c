"""phase2_architecture package."""
