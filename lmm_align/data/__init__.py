"""Data: conversation templates and label masks, image preprocessing, tokenizers."""
