#!/usr/bin/env bash
# Set up (if needed) and run the default test suite (about 10 minutes on 2 CPU cores).
# Usage: bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}"
exec .venv/bin/python -m pytest -m "not slow and not gpu" "$@"
