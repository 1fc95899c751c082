"""Output names that are safe as one file name on every OS ComfyUI runs on."""

from __future__ import annotations

import re

MAX_NAME_LENGTH = 100
_SUFFIX = ".safetensors"
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com[1-9¹²³]|lpt[1-9¹²³])(\..*)?$", re.IGNORECASE)
_FORBIDDEN_CHARS = set('/\\:*?"<>|')
_EXAMPLE = "Use letters, digits, '-', '_' and '.', e.g. 'sks_dog_lora_r16'."


def validate_output_name(name: str) -> str:
    """Return the file stem for ``models/<kind>/<stem>.safetensors``, or raise ValueError saying why not.

    A trailing ``.safetensors`` is stripped. Refused: empty names, path separators, ``..``, a
    leading dot, control characters, characters Windows forbids in file names (``: * ? " < > |``),
    Windows device names (CON, NUL, COM1, ... with or without extension), a trailing dot, leading
    or trailing spaces and names longer than 100 characters.
    """
    if not isinstance(name, str):
        raise ValueError(f"output name must be text, got {type(name).__name__}. {_EXAMPLE}")
    stem = name
    if stem.lower().endswith(_SUFFIX):
        stem = stem[: -len(_SUFFIX)]
    if not stem:
        raise ValueError(f"output name is empty. {_EXAMPLE}")
    if "/" in stem or "\\" in stem:
        raise ValueError(
            f"output name {name!r} contains a path separator; give a plain file name (it is saved in the "
            f"models folder). {_EXAMPLE}"
        )
    if ".." in stem:
        raise ValueError(f"output name {name!r} contains '..'. {_EXAMPLE}")
    if stem.startswith("."):
        raise ValueError(f"output name {name!r} starts with '.', which hides the file. {_EXAMPLE}")
    bad = sorted({c for c in stem if ord(c) < 32 or ord(c) == 127 or c in _FORBIDDEN_CHARS})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ValueError(f"output name {name!r} contains characters not allowed in file names ({shown}). {_EXAMPLE}")
    if stem.endswith("."):
        raise ValueError(f"output name {name!r} ends with a dot, which Windows drops. {_EXAMPLE}")
    if stem != stem.strip():
        raise ValueError(f"output name {name!r} starts or ends with a space. {_EXAMPLE}")
    if _WINDOWS_RESERVED.match(stem):
        raise ValueError(f"output name {name!r} is a reserved device name on Windows. {_EXAMPLE}")
    if len(stem) > MAX_NAME_LENGTH:
        raise ValueError(
            f"output name is {len(stem)} characters long; use at most {MAX_NAME_LENGTH}. {_EXAMPLE}"
        )
    return stem
