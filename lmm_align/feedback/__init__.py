"""Feedback for alignment: RLAIF-V claims -> questions -> labeler; critic prompts and parsing."""
