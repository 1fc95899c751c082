"""What ComfyUI-Manager and the Comfy registry read: requirements with lower bounds only (nothing
that would downgrade another pack's packages), a complete pyproject.toml, a CHANGELOG whose newest
version is the one published, and a README that names the versions this was tested with."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import xml.etree.ElementTree as ElementTree

import pytest
import tomllib
from packaging.requirements import Requirement

from scripts.comfyserver import REPO_ROOT, comfyui_path

pytestmark = pytest.mark.trainers

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def comfyui_version() -> str:
    return re.search(r'__version__ = "([^"]+)"', (comfyui_path() / "comfyui_version.py").read_text()).group(1)


def requirement_lines(text: str) -> list[str]:
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def test_requirements_have_lower_bounds_only():
    requirements = [Requirement(line) for line in requirement_lines((REPO_ROOT / "requirements.txt").read_text())]
    assert {r.name for r in requirements} >= {"diffusers", "transformers", "peft", "accelerate",
                                              "opencv-python-headless"}
    for requirement in requirements:
        operators = {spec.operator for spec in requirement.specifier}
        assert operators and operators <= {">=", "!="}, f"{requirement}: only >= (and != for a known-broken release)"
    # pyproject.toml lists the same (plus what ComfyUI itself brings), with the same bounds
    listed = {Requirement(line).name: str(Requirement(line).specifier) for line in PYPROJECT["project"]["dependencies"]}
    for requirement in requirements:
        assert listed.get(requirement.name) == str(requirement.specifier), requirement.name
    assert set(listed) - {r.name for r in requirements} <= {"torch", "numpy", "Pillow", "safetensors"}
    for line in PYPROJECT["project"]["dependencies"]:
        assert {s.operator for s in Requirement(line).specifier} <= {">=", "!="}, line


def test_pyproject_is_complete_for_the_comfy_registry():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    # the registry's rules for a node id: < 100 characters, letters, digits, - _ ., no doubled
    # special character, starts with a letter, no "ComfyUI" in it
    assert re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?![-_.]))*", project["name"]) and len(project["name"]) < 100
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert (REPO_ROOT / project["license"]["file"]).is_file()
    assert project["description"] and project["requires-python"]
    assert "Operating System :: OS Independent" in project["classifiers"]
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"].startswith(">=")
    # the icon: a file of this repository, as its raw URL on main, SVG within 800 x 400
    prefix = project["urls"]["Repository"].replace("https://github.com/", "https://raw.githubusercontent.com/")
    assert comfy["Icon"].startswith(prefix + "/main/")
    icon = REPO_ROOT / comfy["Icon"].removeprefix(prefix + "/main/")
    svg = ElementTree.parse(icon).getroot()
    assert svg.tag.endswith("svg") and int(svg.get("width")) <= 800 and int(svg.get("height")) <= 400
    # the running ComfyUI satisfies the declared minimum
    version = comfyui_version()
    minimum = comfy["requires-comfyui"].removeprefix(">=")
    assert tuple(map(int, version.split("."))) >= tuple(map(int, minimum.split(".")))


def test_changelog_newest_version_is_the_published_one():
    text = (REPO_ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## (\d+\.\d+\.\d+) - \d{4}-\d{2}-\d{2}$", text, flags=re.M)
    assert versions and versions[0] == PYPROJECT["project"]["version"]
    keys = [tuple(map(int, v.split("."))) for v in versions]
    assert keys == sorted(keys, reverse=True) and len(set(keys)) == len(keys)


def readme_versions() -> dict[str, str]:
    """README "Tested with": {what: the version `make test` ran with}."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("### Tested with", 1)[1].split("\n#", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip().strip("`"): cells[1].strip().strip("`") for cells in rows[1:]}


def test_readme_names_the_versions_make_test_runs_with():
    table = readme_versions()
    expected = {"Python": sys.version.split()[0], "ComfyUI": comfyui_version()}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy",
                 "opencv-python-headless"):
        expected[name] = importlib.metadata.version(name)
    assert {name: table.get(name) for name in expected} == expected
