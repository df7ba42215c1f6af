#!/usr/bin/env bash
# Re-resolves the dependencies from pyproject.toml alone (no constraints) in a scratch venv and
# writes the exact versions to constraints.txt. Run it when you mean to move to newer packages,
# then run the full test suite (bash .ci/run) before committing the new constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/pip" install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch/torchvision together: open_clip needs torchvision, and only this pair imports on our CPU machines.
"$scratch/venv/bin/pip" install --quiet "torch==2.14.1" "torchvision==0.29.1" ".[test,s3]" 2>&1 | grep -v "is ignored" || true
{
  echo "# Exact versions CI passed with; scripts/install.sh installs with -c constraints.txt."
  echo "# Refresh: bash scripts/refresh-constraints.sh (then run bash .ci/run)."
  "$scratch/venv/bin/pip" freeze --exclude-editable | grep -v "^erasure-probe-engine"
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages"
