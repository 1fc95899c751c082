"""Output names that are safe as one file name on every OS ComfyUI runs on, and that look like
what they are.

The same rule runs in the nodes' ``validate_inputs`` (a bad name is refused at ``/prompt``) and in
the job before anything loads, so no name can fail at save time after a long training run.
"""

from __future__ import annotations

import re
import unicodedata

# In UTF-8 bytes. File systems allow 255 bytes per name; the pack's temporary names add about 40
# (".<name>.safetensors.dbs-<pid>-<random>.tmp") and periodic saves a step suffix, so 128 bytes of
# stem always fit. 128 bytes is 128 ASCII characters, 64 accented Latin or 42 CJK characters.
MAX_NAME_BYTES = 128
_SUFFIX = ".safetensors"
# Windows device names, with or without an extension (and with trailing spaces before it, which
# Windows ignores): CON, PRN, AUX, NUL, COM0-9, LPT0-9 (also with superscript digits), CONIN$,
# CONOUT$ and CLOCK$.
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$|clock\$) *(\..*)?$",
                               re.IGNORECASE)
_FORBIDDEN_CHARS = set('/\\:*?"<>|')
# Unicode categories refused: controls (C0, DEL, C1), format characters (bidi overrides such as
# U+202E, zero-width spaces and joiners, BOM), surrogates, private use, unassigned, and line /
# paragraph separators. They are invisible or make a name display as something else.
_INVISIBLE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
_EXAMPLE = "Use letters, digits, '-', '_' and '.', e.g. 'sks_dog_lora_r16'."


def _describe(char: str) -> str:
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X}" + (f" {name}" if name else "")


def validate_output_name(name: str) -> str:
    """Return the file stem for ``models/<kind>/<stem>.safetensors``, or raise ValueError saying why not.

    The name is NFC-normalised (so two spellings of "é" are one file) and a trailing
    ``.safetensors`` is stripped. Refused: empty names, path separators, ``..``, a leading dot,
    control, format (bidi, zero-width), private-use and unassigned characters, spaces other than
    the plain space, characters Windows forbids in file names (``: * ? " < > |``), Windows device
    names (CON, NUL, COM1, CONIN$, ... with or without extension), a trailing dot, leading or
    trailing spaces and names longer than ``MAX_NAME_BYTES`` bytes in UTF-8.
    """
    if not isinstance(name, str):
        raise ValueError(f"output name must be text, got {type(name).__name__}. {_EXAMPLE}")
    invisible = sorted({c for c in name if unicodedata.category(c) in _INVISIBLE_CATEGORIES
                        or (unicodedata.category(c) == "Zs" and c != " ")})
    if invisible:
        shown = ", ".join(_describe(c) for c in invisible)
        raise ValueError(f"output name {name.encode('ascii', 'backslashreplace').decode()!r} contains invisible, "
                         f"control or direction-changing characters ({shown}); type the name again. {_EXAMPLE}")
    stem = unicodedata.normalize("NFC", name)
    if stem.lower().endswith(_SUFFIX):
        stem = stem[: -len(_SUFFIX)]
    if not stem:
        raise ValueError(f"output name is empty. {_EXAMPLE}")
    size = len(stem.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise ValueError(
            f"output name is {len(stem)} characters, {size} bytes in UTF-8; file names allow at most "
            f"{MAX_NAME_BYTES} bytes here (about {MAX_NAME_BYTES // 3} CJK or {MAX_NAME_BYTES} ASCII characters): "
            f"shorten it. {_EXAMPLE}")
    if "/" in stem or "\\" in stem:
        raise ValueError(
            f"output name {name!r} contains a path separator; give a plain file name (it is saved in the "
            f"models folder). {_EXAMPLE}"
        )
    if ".." in stem:
        raise ValueError(f"output name {name!r} contains '..'. {_EXAMPLE}")
    if stem.startswith("."):
        raise ValueError(f"output name {name!r} starts with '.', which hides the file. {_EXAMPLE}")
    bad = sorted({c for c in stem if c in _FORBIDDEN_CHARS})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ValueError(f"output name {name!r} contains characters not allowed in file names ({shown}). {_EXAMPLE}")
    if stem.endswith("."):
        raise ValueError(f"output name {name!r} ends with a dot, which Windows drops. {_EXAMPLE}")
    if stem != stem.strip():
        raise ValueError(f"output name {name!r} starts or ends with a space. {_EXAMPLE}")
    if _WINDOWS_RESERVED.match(stem):
        raise ValueError(f"output name {name!r} is a reserved device name on Windows. {_EXAMPLE}")
    return stem
