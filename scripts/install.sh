#!/usr/bin/env bash
# Creates .venv and installs the engine with its test tools. Works on a fresh machine.
# Every package at the exact version of constraints.txt (what CI passed with; refresh it with
# scripts/refresh-constraints.sh). torch/torchvision are pinned together: open_clip needs
# torchvision, and on CPU-only machines only torch 2.14.1 + torchvision 0.29.1 import together.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/pip install --quiet -c constraints.txt "torch==2.14.1" "torchvision==0.29.1" -e ".[test]" 2>&1 \
    | grep -v "is ignored" || true
.venv/bin/python -c "import engine, torch, diffusers, ray, open_clip" 
