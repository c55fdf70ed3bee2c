"""Phase 1 modules: backprop in NumPy, a scalar autograd engine, attention."""
