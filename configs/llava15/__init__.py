"""LLaVA-1.5 recipes: stage-1 projector pretraining and stage-2 visual instruction tuning."""
