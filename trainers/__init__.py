"""DreamBooth Studio engine: Stable Diffusion 1.5 loading, saving and training without ComfyUI.

Wings, each importing only from the ones before it (a test keeps it so):

- ``files``: atomic, deterministic safetensors writing, content hashes, safe output names.
- ``sd15``: the SD1.5 model: architecture configs, LDM <-> diffusers conversion, checkpoint
  and diffusers-folder loading and single-file saving, random-weight placeholder models.
- ``data``: what is trained on: subject photos (``images``, ``subject``) and the class images of
  prior preservation (``class_images``). ``control`` (Canny edges for ControlNet) sits beside it.
- ``training``: configs, callbacks, the shared loop with its optimizer and precision, the LoRA
  and DreamBooth trainers, and the record each file carries (fingerprint, metadata, curves).
- ``jobs``: the only orchestration (checks, reuse, base model, class images, train, save).
- ``cli``: the only command line, ``python -m trainers lora|dreambooth|placeholder``.

Nothing is imported here on purpose: torch, diffusers and transformers load only when a module
that needs them is imported, so importing the package stays cheap.
"""
