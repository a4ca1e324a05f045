"""Judges: models asked for a verdict in text (a critic, a labeler, an HTTP endpoint)."""
