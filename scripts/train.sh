#!/usr/bin/env bash
# Train with the real `caffe train` into a run directory (runs/<variant>/<timestamp>/).
#
#   scripts/train.sh VARIANT|SOLVER.prototxt [--gpu 0|0,1|all|cpu] [--resume] [--weights X.caffemodel]
#                    [--run-dir DIR]
#
# Works from any directory: a VARIANT is the repo's prototxt/VARIANT/solver.prototxt, and
# the paths you type (SOLVER, --weights, --run-dir, --runs-root) are relative to where you are.
# Ctrl-C and SIGTERM (Slurm's time limit, scancel, docker stop) make Caffe snapshot before it
# exits (-sigint_effect stop with snapshot_after_train; Caffe's "snapshot" effect would snapshot
# and keep training), so a run can always be continued with --resume. SIGHUP writes a snapshot
# and training goes on. Same run layout as tools/train.py (which adds --anneal plateau); see
# `.venv/bin/python tools/train.py --help` for every flag.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -x "$REPO/.venv/bin/python" ] || { echo "train.sh: error: no $REPO/.venv; run scripts/setup.sh first" >&2; exit 1; }
exec "$REPO/.venv/bin/python" -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); import train; sys.exit(train.main(sys.argv[1:], prog="train.sh", default_engine="binary"))' "$REPO/tools" "$@"
