"""phase5_production package."""
