"""The SD1.5 model: architecture configs, conversion, loading and saving, placeholder models."""
