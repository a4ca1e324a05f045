"""LLaVA-RLHF recipes (arXiv 2309.14525): SFT, the fact-augmented reward model, PPO."""
