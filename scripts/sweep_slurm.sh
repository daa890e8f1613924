#!/usr/bin/env bash
# A hyper-parameter sweep as a Slurm job array: each array task is one tools/sweep.py worker on
# one GPU (or CPUs with --device cpu) against the study's shared storage.
#
#   scripts/sweep_slurm.sh SPACE [--tasks 4] [--time 24:00:00] [--storage postgresql://...] [--submit]
#
# Writes sweeps/<name>/slurm_job.sh and the copy of SPACE its tasks read, sweeps/<name>/space.<ext>
# (run it yourself with sbatch, or pass --submit). Every node must see the repo and its .venv,
# sweeps/<name>/, the space's lmdb_dir and the Caffe install ($TINYCAFFE_HOME, default
# ~/.cache/tinycaffe). Each worker gets SIGTERM --stop-before seconds (default 120) before the
# time limit and snapshots its trial, which is marked failed and not resumed: the same command
# again continues the study with new trials, so --time must exceed one trial. Paths you type
# are relative to where you are. See `.venv/bin/python tools/sweep_slurm.py --help` for every flag.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -x "$REPO/.venv/bin/python" ] || { echo "sweep_slurm.sh: error: no $REPO/.venv; run scripts/setup.sh first" >&2; exit 1; }
exec "$REPO/.venv/bin/python" -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); import sweep_slurm; sys.exit(sweep_slurm.main(sys.argv[1:], prog="sweep_slurm.sh"))' "$REPO/tools" "$@"
