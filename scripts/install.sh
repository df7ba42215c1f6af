#!/usr/bin/env bash
# Creates .venv and installs the engine with its test tools. Works on a fresh machine.
# torch/torchvision are pinned together: open_clip needs torchvision, and on our machines
# only torch 2.14.1 + torchvision 0.29.1 import together (see shared/reference/environment.md).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/pip install --quiet "torch==2.14.1" "torchvision==0.29.1" -e ".[test]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import engine, torch, diffusers, ray, open_clip" 
