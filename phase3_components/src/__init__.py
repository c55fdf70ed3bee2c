"""Phase 3 modules: tokenizers, data pipelines, optimizers."""
