#!/usr/bin/env bash
# Run timm's own tests/test_models.py (from the sdist of the installed timm) on didicm's twins, plus our checks.
# The sdist is the only source of timm's tests: the wheel does not ship them.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(.venv/bin/python -c "import timm; print(timm.__version__)")
dest=${TIMM_SDIST_DIR:-/tmp/timm_sdist}
if [ ! -f "$dest/timm-$version/tests/test_models.py" ]; then
    mkdir -p "$dest"
    .venv/bin/python -m pip download --quiet --no-deps --no-binary :all: "timm==$version" -d "$dest"
    tar -xzf "$dest/timm-$version.tar.gz" -C "$dest"
fi
TIMM_TESTS_DIR="$dest/timm-$version/tests" DIDICM_TIMM_TESTS_FULL=${DIDICM_TIMM_TESTS_FULL:-1} \
    .venv/bin/python -m pytest tests/test_timm_conventions.py -q -p no:warnings "$@"
