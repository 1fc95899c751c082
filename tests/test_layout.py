"""The engine's layers, kept by test: trainers/ imports only downwards through its wings, has no
import cycle and no function-level import of its own modules; node modules never import each
other (what they share lives in helper modules of nodes/)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.paths import repo_root

pytestmark = pytest.mark.trainers

# Each wing may import from wings of a lower level (and from itself); wings of the same level
# (data and control) do not import each other.
WING_LEVELS = {"files": 0, "sd15": 1, "data": 2, "control": 2, "training": 3, "eval": 4, "jobs": 5, "runfile": 5, "cli": 6,
               "__main__": 7}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(repo_root()).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def engine_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((repo_root() / "trainers").rglob("*.py"))}


def own_imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported engine module, line, at module top level) for every import of an engine module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix
                       for alias in node.names]
        else:
            continue
        found += [(t, node.lineno, id(node) in top_level) for t in targets if t in modules and t != "trainers"]
    return found


def wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_engine_modules_import_only_downwards_without_cycles_or_hidden_imports():
    modules = engine_modules()
    unplaced = sorted(m for m in modules if m != "trainers" and wing(m) not in WING_LEVELS)
    assert not unplaced, f"modules outside the wings {sorted(WING_LEVELS)}: {unplaced}"
    graph: dict[str, set[str]] = {}
    upward, hidden = [], []
    for module, path in modules.items():
        graph[module] = set()
        for target, line, at_top in own_imports(path, modules):
            graph[module].add(target)
            source_wing, target_wing = wing(module), wing(target)
            if source_wing is None or target_wing is None:
                continue
            if not at_top:
                hidden.append(f"{module}:{line} imports {target} inside a function")
            if source_wing != target_wing and WING_LEVELS[target_wing] >= WING_LEVELS[source_wing]:
                upward.append(f"{module}:{line} ({source_wing}) imports {target} ({target_wing})")
    assert not upward, "imports that go up or sideways between wings:\n" + "\n".join(upward)
    assert not hidden, "function-level imports of engine modules (they hide cycles):\n" + "\n".join(hidden)

    cycles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_what_it_forbids(tmp_path):
    """The resolver finds relative, absolute and function-level imports (so the test above can fail)."""
    modules = engine_modules()
    lora = repo_root() / "trainers" / "training" / "lora.py"
    imported = {target for target, _, _ in own_imports(lora, modules)}
    assert {"trainers.data.subject", "trainers.training.loop", "trainers.sd15.checkpoint"} <= imported
    jobs = {target for target, _, _ in own_imports(repo_root() / "trainers" / "jobs.py", modules)}
    assert "trainers.sd15.checkpoint" in jobs  # `from .sd15 import checkpoint`


def test_node_modules_do_not_import_each_other():
    folder = repo_root() / "nodes"
    node_modules, imports = set(), {}
    for path in sorted(folder.glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(n, ast.ClassDef) and any(ast.unparse(b).endswith("ComfyNode") for b in n.bases)
               for n in tree.body):
            node_modules.add(path.stem)
        imports[path.stem] = {n.module.split(".")[0] for n in ast.walk(tree)
                              if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}
    assert {"lora_train", "dreambooth_train", "subject", "lora_apply", "canny", "sweep_grid"} <= node_modules
    crossing = {m: sorted(imports[m] & node_modules) for m in node_modules if imports[m] & node_modules}
    assert not crossing, f"node modules importing other node modules: {crossing}"
