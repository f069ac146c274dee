"""Experiments that run the face task directly (no checkpoints) and print tables."""
