#!/usr/bin/env bash
# One-command set-up (`make setup`): system packages, then .venv with pinned packages.
# `tools/setup.sh --test` (`make test` runs it) installs only the system packages the tests alone need.
# torch and torchvision are installed first, alone, as a matched pair.
set -euo pipefail
cd "$(dirname "$0")/.."

# apt-get install the packages of $@ that are missing.
apt_install() {
  local missing=""
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
  done
  [ -z "$missing" ] && return 0
  echo "setup: installing system packages:$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $missing >/dev/null
}

if [ "${1:-}" = "--test" ]; then
  # Only the tests need these (the results page in headless Chromium, the search's PostgreSQL study).
  apt_install chromium postgresql || echo "setup: warning: could not install chromium/postgresql: the tests that need them fail"
  exit 0
fi

PYTHON="${PYTHON:-python3}"
# trl 1.15/1.16 and the pins need Python >= 3.11: say so in one line, before pip says it its own way.
found=$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) || found=""
case "$found" in
  3.1[1-9].*|3.[2-9][0-9].*|[4-9].*) ;;
  *) echo "setup: error: Python >= 3.11 is needed, found ${found:-nothing that runs} at $(command -v "$PYTHON" || echo "$PYTHON"): install python3.11 (e.g. apt-get install python3.11 python3.11-venv) and run PYTHON=python3.11 make setup" >&2
     exit 1 ;;
esac
if [ -x .venv/bin/python ] && ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: error: .venv has $(.venv/bin/python --version 2>&1) (>= 3.11 needed): remove it (make clean-venv) and run make setup again" >&2
  exit 1
fi

apt_install fonts-noto-cjk tesseract-ocr tesseract-ocr-chi-tra tesseract-ocr-eng

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip==26.0.1 2>/dev/null || .venv/bin/pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && [ "${CPU_ONLY:-0}" != 1 ]; then
  echo "setup: CUDA GPU found: installing the GPU set (requirements-gpu.txt)"
  .venv/bin/pip install -q -r requirements-gpu.txt
else
  # torch and torchvision first, alone, so nothing later pulls another build. torchvision: Gemma 4's and
  # Qwen3-VL's processors hold a video processor built on it. PyTorch's CPU index (CPU builds) when it
  # answers within a few seconds; else pip's own index, whose builds of this pair are CUDA builds that run
  # on the CPU (~5.5 GB in .venv; PyPI's torchvision does not load beside a CPU-only torch).
  CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
  TORCH_PAIR="torch==2.14.1 torchvision==0.29.1"
  if timeout 8 .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" \
      "$CPU_INDEX" >/dev/null 2>&1; then
    .venv/bin/pip install -q $TORCH_PAIR --index-url "$CPU_INDEX"
  else
    echo "setup: $CPU_INDEX does not answer: torch and torchvision from pip's configured index"
    .venv/bin/pip install -q $TORCH_PAIR
  fi
  .venv/bin/python -W ignore -c "import torch, torchvision; print('setup: torch', torch.__version__, 'torchvision', torchvision.__version__, '(CUDA ' + torch.version.cuda + ' build, runs on the CPU)' if torch.version.cuda else '(CPU build)')"
  .venv/bin/pip install -q -r requirements.txt
fi
.venv/bin/pip check
