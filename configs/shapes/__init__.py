"""Configs of the synthetic shapes world (the test bed): SFT, reward model, PPO, DPO, iterative DPO."""
