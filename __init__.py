"""DreamBooth Studio: subject-driven fine-tuning of Stable Diffusion 1.5 as ComfyUI nodes.

ComfyUI imports this folder as a package. Only the V3 entry point and the web directory are
exported; the node classes (and diffusers, which they import lazily) load when ComfyUI asks for
the extension, so importing the pack is cheap and has no side effects. Asking for the extension sets
MKL_CBWR (unless set already), so that the CPU training is bit-reproducible: see
trainers/training/determinism.py.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .trainers.training.determinism import request_reproducible_blas

    request_reproducible_blas()  # before anything of ours runs a matrix product
    from .nodes import DreamBoothStudioExtension

    return DreamBoothStudioExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
