"""Helpers shared by the test tiers (paths, generated test models, ComfyUI checks)."""
