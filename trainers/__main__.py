"""``python -m trainers <command> ...``: the engine's command-line tools."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "lora": ("trainers.lora", "train a LoRA on a folder of subject photos"),
    "dreambooth": ("trainers.dreambooth", "fine-tune the whole UNet (DreamBooth) and save a checkpoint"),
    "placeholder": ("trainers.placeholder", "write random-weight SD1.5 test models"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(len(name) for name in COMMANDS)
        lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
        sys.stdout.write(
            "usage: python -m trainers <command> [options]\n\ncommands:\n" + "\n".join(lines) + "\n\n"
            "python -m trainers <command> --help shows a command's options.\n"
        )
        unknown = bool(argv) and argv[0] not in ("-h", "--help")
        if unknown:
            sys.stderr.write(f"unknown command {argv[0]!r}\n")
        return 2 if unknown else 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
