"""lmm_align: hallucination alignment for LLaVA-style models in JAX/Flax."""
