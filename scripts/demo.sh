#!/usr/bin/env bash
# Quick start, main job: train DiDiCM and its twin on the embedded digits set and compare them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/didicm demo "$@"
