"""LLaVA-Critic recipes (arXiv 2410.02712): the critic on LLaVA-Critic-113k, OV-Chat iterative DPO."""
