"""Atomic safetensors files, content hashes and safe output names (imports nothing of the engine)."""
