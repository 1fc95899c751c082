"""Conditioning images for generation (Canny edges for a ControlNet); not used in training."""
