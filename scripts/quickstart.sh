#!/usr/bin/env bash
# Set up (if needed) and run the quickstart: a tiny model trained on the built-in toy world, on CPU.
# Usage: bash scripts/quickstart.sh [extra flags for `uniperceiver pretrain`]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}"
set +e
.venv/bin/uniperceiver pretrain recipes/pretrain/quickstart.yaml "$@"
rc=$?
set -e
if [ "$rc" = "3" ]; then
  echo "[quickstart] the training engine is not in this version yet (exit 3); the recipe above was validated." >&2
fi
exit "$rc"
