"""sparse_moe_transformer package."""
