#!/usr/bin/env bash
# One-time (idempotent) set-up of a development environment in .venv:
#   system packages (FFmpeg shared libraries for TorchCodec), uv, the project and its dev extras.
# Usage: bash scripts/setup.sh        (re-running is cheap: everything already present is kept)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

# FFmpeg shared libraries: TorchCodec needs them; without them video falls back to PyAV (slower).
if ! ldconfig -p 2>/dev/null | grep -q 'libavutil\.so'; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    log "installing ffmpeg (apt-get)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null) \
      || log "could not install ffmpeg; video decoding will use the PyAV fallback"
  else
    log "FFmpeg libraries not found and not root: install ffmpeg for TorchCodec; PyAV fallback is used meanwhile"
  fi
fi

# A Java runtime: only the reference caption metrics (pycocoevalcap, `--metrics-backend coco`) and their parity
# tests need it; our own caption metrics do not.
if ! command -v java >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    log "installing a Java runtime (apt-get) for the reference caption metrics"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null) \
      || log "could not install Java; pycocoevalcap parity tests will be skipped"
  else
    log "java not found: pycocoevalcap parity tests will be skipped"
  fi
fi

PYTHON="${PYTHON:-python3}"
if ! command -v uv >/dev/null 2>&1; then
  log "installing uv"
  "$PYTHON" -m pip install -q --disable-pip-version-check uv
fi
UV="$(command -v uv || echo "$PYTHON -m uv")"

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  $UV venv -q .venv --python "$PYTHON"
fi
log "installing uniperceiver-cli with dev extras into .venv"
$UV pip install -q --python .venv/bin/python -e ".[dev]"
log "ready: $(.venv/bin/uniperceiver --version)"
