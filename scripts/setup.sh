#!/usr/bin/env bash
# Create .venv with larosa installed (editable) and its test tools. Installs the pinned CPU build of torch first
# where it is available, so pip never pulls a multi-GB CUDA build for a CPU machine; elsewhere pip picks torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0 || .venv/bin/python -m pip install -q torch
.venv/bin/python -m pip install -q -e ".[test]"
