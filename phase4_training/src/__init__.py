"""Phase 4 modules: training loop, LoRA, reward model, DPO, PPO."""
