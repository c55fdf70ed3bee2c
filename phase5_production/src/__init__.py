"""Phase 5 modules: KV cache, sampling, quantization, speculative decoding, serving."""
