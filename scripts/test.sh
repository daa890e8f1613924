#!/usr/bin/env bash
# Set everything up (Debian packages, Caffe: the active flavour, else CPU; .venv), then run
# the test suite (it runs nets in CPU mode, which a CUDA build does too).
#   scripts/test.sh [pytest args...]
# pytest exits 5 when no test ran; with `set -e` that fails this script too,
# so a run that selected nothing can never pass silently.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/setup.sh"
cd "$REPO"
exec "$REPO/.venv/bin/python" -m pytest "$@"
