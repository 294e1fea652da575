"""Pieces more than one stage needs. Nothing here imports torch at module level."""
