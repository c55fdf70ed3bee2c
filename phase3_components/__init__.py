"""phase3_components package."""
