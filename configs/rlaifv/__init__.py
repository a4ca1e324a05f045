"""RLAIF-V recipes (arXiv 2405.17220): DPO on RLAIF-V-Dataset, the iterative feedback loop."""
