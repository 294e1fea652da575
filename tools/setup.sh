#!/usr/bin/env bash
# One-command set-up (`make setup`): system packages, then .venv with pinned packages.
# torch is installed first, alone, so nothing later pulls a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="fonts-noto-cjk tesseract-ocr tesseract-ocr-chi-tra tesseract-ocr-eng postgresql chromium"
missing=""
for pkg in $APT_PACKAGES; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  echo "setup: installing system packages:$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $missing >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip==26.0.1 2>/dev/null || .venv/bin/pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && [ "${CPU_ONLY:-0}" != 1 ]; then
  echo "setup: CUDA GPU found: installing the GPU set (requirements-gpu.txt)"
  .venv/bin/pip install -q -r requirements-gpu.txt
else
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -r requirements.txt
fi
.venv/bin/pip check
