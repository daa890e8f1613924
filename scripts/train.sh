#!/usr/bin/env bash
# Train with the real `caffe train` into a run directory (runs/<variant>/<timestamp>/).
#
#   scripts/train.sh VARIANT|SOLVER.prototxt [--gpu 0|0,1|all|cpu] [--resume] [--weights X.caffemodel]
#                    [--run-dir DIR]
#
# Ctrl-C makes Caffe snapshot before it exits (-sigint_effect stop with snapshot_after_train;
# Caffe's "snapshot" effect would snapshot and keep training), so a run can always be
# continued with --resume. SIGHUP writes a snapshot and training goes on. Same run layout as tools/train.py (which adds
# --anneal plateau); see `.venv/bin/python tools/train.py --help` for every flag.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
[ -x .venv/bin/python ] || { echo "train.sh: error: no .venv; run scripts/setup.sh first" >&2; exit 1; }
exec .venv/bin/python -c 'import sys; sys.path.insert(0, "tools"); import train; sys.exit(train.main(sys.argv[1:], prog="train.sh", default_engine="binary"))' "$@"
