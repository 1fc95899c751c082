"""DreamBooth Studio engine: Stable Diffusion 1.5 loading, saving and training without ComfyUI.

Nothing is imported here on purpose: torch, diffusers and transformers load only when a
submodule that needs them is imported, so importing the package stays cheap.
"""
