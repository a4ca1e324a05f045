"""Hugging Face interop: local checkpoint folders in, HF folders out (safetensors only by default)."""

from lmm_align.hf.checkpoint import CheckpointError, load_pretrained, read_config, save_pretrained

__all__ = ["CheckpointError", "load_pretrained", "read_config", "save_pretrained"]
