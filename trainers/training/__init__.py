"""Configs, callbacks, the shared loop, the LoRA and DreamBooth trainers and their file record."""
