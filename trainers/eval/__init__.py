"""Scoring generated images against the subject: DINO, CLIP-I and CLIP-T (see fidelity.py)."""
