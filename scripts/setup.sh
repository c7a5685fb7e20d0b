#!/usr/bin/env bash
# Create .venv and install didicm with its dev tools and the generative peers' extra. Idempotent: a second run only checks a stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.didicm-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
    # torch/torchvision resolve to the releases this machine keeps on disk (see README: Installation).
    .venv/bin/python -m pip install --quiet -e '.[dev,peers]'
    echo "$want" > "$stamp"
fi
