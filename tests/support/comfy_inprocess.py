"""ComfyUI imported into the test process, with private folders and this pack loaded the way
ComfyUI loads it (as package `dreambooth_studio`, relative imports and all)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from scripts.comfyserver import PACK_DIR_NAME, REPO_ROOT, comfyui_path


def import_comfyui(base_dir: Path, models: dict[str, list[Path]]) -> ModuleType:
    """Import ComfyUI's folder_paths etc. from $COMFYUI_PATH / the dev copy and point its folders
    at `base_dir`. ComfyUI goes first on sys.path so that `nodes` is ComfyUI's nodes.py, not ours."""
    comfy_dir = str(comfyui_path())
    if sys.path[0] != comfy_dir:
        sys.path.insert(0, comfy_dir)
    loaded_nodes = sys.modules.get("nodes")
    if loaded_nodes is not None and not str(getattr(loaded_nodes, "__file__", "")).startswith(comfy_dir):
        raise RuntimeError("a module named 'nodes' that is not ComfyUI's was imported first")
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # as `main.py --cpu`; must precede comfy.model_management
    import folder_paths

    for sub in ("input", "output", "temp"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.set_input_directory(str(base_dir / "input"))
    folder_paths.set_output_directory(str(base_dir / "output"))
    folder_paths.set_temp_directory(str(base_dir / "temp"))
    for kind in ("checkpoints", "loras", "controlnet"):
        folder = base_dir / "models" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for f in models.get(kind, []):
            link = folder / Path(f).name
            if not link.exists():
                link.symlink_to(Path(f).resolve())
        folder_paths.add_model_folder_path(kind, str(folder), is_default=True)
    return folder_paths


def import_pack() -> ModuleType:
    """The pack as ComfyUI imports it (package `dreambooth_studio`)."""
    if PACK_DIR_NAME in sys.modules:
        return sys.modules[PACK_DIR_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_DIR_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_DIR_NAME] = module
    spec.loader.exec_module(module)
    return module
