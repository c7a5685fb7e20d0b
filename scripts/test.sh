#!/usr/bin/env bash
# Quick start, test suite: the whole pytest suite in a fresh .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Fashion-MNIST (Debian's dataset-fashion-mnist) lets the real-data loader test run; the suite skips it
# when the package cannot be installed (not root, no apt).
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || \
        echo "note: could not install dataset-fashion-mnist; its test will be skipped"
fi
exec .venv/bin/python -m pytest "$@"
