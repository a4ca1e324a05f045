"""Hugging Face interop: local checkpoint folders in, HF folders out (safetensors only by default)."""

from lmm_align.hf.checkpoint import (
  CheckpointError,
  load_language_model,
  load_pretrained,
  load_vision_tower,
  pretrained_model,
  read_config,
  save_pretrained,
  save_vision_tower,
)

__all__ = [
  "CheckpointError",
  "load_language_model",
  "load_pretrained",
  "load_vision_tower",
  "pretrained_model",
  "read_config",
  "save_pretrained",
  "save_vision_tower",
]
