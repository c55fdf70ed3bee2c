"""The Sparse Mixture-of-Experts transformer: model, data, training CLI."""
