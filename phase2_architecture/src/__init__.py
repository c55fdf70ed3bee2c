"""Phase 2 modules: transformer building blocks and GPT."""
