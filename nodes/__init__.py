"""ComfyUI V3 nodes of DreamBooth Studio.

The only layer that imports ComfyUI (comfy_api, comfy, folder_paths, server). Each node maps its
inputs onto a trainers/ config and its results back onto ComfyUI types.
"""

import logging

from comfy_api.latest import ComfyExtension, io


class DreamBoothStudioExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI asks once, at start-up (it does not call on_load): the moment to remove what a
        # killed process of this pack left behind, before this process writes anything.
        from ..trainers.data.images import opencv_problem
        from .bridge import sweep_stale_files
        from .live import register_routes
        from .scoring import register_model_folder

        problem = opencv_problem()
        if problem:
            logging.getLogger(__name__).warning("DreamBooth Studio: %s", problem)
        sweep_stale_files()
        register_routes()
        register_model_folder()
        return all_nodes()


def all_nodes() -> list[type[io.ComfyNode]]:
    # Imported here so that loading the extension object stays cheap.
    from .canny import CannyControl
    from .dreambooth_train import DreamBoothTrain
    from .fidelity import LoadFidelityModels, SubjectFidelity
    from .lora_apply import ApplyLoRAScaled
    from .lora_train import LoRATrain
    from .subject import LoadSubjectImages
    from .sweep_grid import LoRAScaleGrid

    return [LoadSubjectImages, LoRATrain, DreamBoothTrain, ApplyLoRAScaled, CannyControl, LoRAScaleGrid,
            LoadFidelityModels, SubjectFidelity]
