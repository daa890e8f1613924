#!/usr/bin/env bash
# The whole job on the embedded sample dataset, on CPU, from a clean clone:
# set-up -> sample data -> LMDB -> prototxt -> a short training (scripts/train.sh) with its
# curves -> evaluation -> the validated submission file -> pictures, report, classify.py.
# The terminal gets a line or two per step; every step's full output is in
# runs/quickstart/quickstart.log (a failing step shows its last lines there and then).
#
#   scripts/quickstart.sh [--iters N]     (default 600: about 15 s of training on 2 cores)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="$REPO/.venv/bin/python"
SAMPLE="data/sample/tiny-imagenet-200"
LMDB="data/sample/lmdb"
RUN="runs/quickstart"
ITERS=600
while [ $# -gt 0 ]; do
  case "$1" in
    --iters) ITERS="${2:?--iters needs a number}"; shift ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "quickstart.sh: error: unknown option '$1' (valid: --iters N, --help)" >&2; exit 2 ;;
  esac
  shift
done
LOG="$RUN/quickstart.log"
mkdir -p "$RUN"
: > "$LOG"
step() { printf '[quickstart] %s\n' "$*"; printf '\n== %s\n' "$*" >> "$LOG"; }
# Run a command with its output in the log only; on failure show its last lines, and stop.
quiet() {
  "$@" >> "$LOG" 2>&1 && return 0
  printf '[quickstart] error: this step failed: %s\n' "$*" >&2
  tail -n 15 "$LOG" | sed 's/^/  | /' >&2
  printf '[quickstart] its full output: %s\n' "$LOG" >&2
  exit 1
}
T0=$SECONDS

step "1. set-up: Debian packages, Caffe 1.0 (a first run builds it: ~3 min), .venv, Caffe self-check"
quiet scripts/setup.sh
echo "  ready: $(.venv/bin/caffe --version 2>/dev/null), pycaffe self-check passed"

step "2. sample dataset in the Tiny ImageNet layout -> $SAMPLE"
if [ -f "$SAMPLE/wnids.txt" ]; then
  echo "  already there (delete $SAMPLE to regenerate)"
else
  quiet "$PY" tools/make_sample_data.py "$SAMPLE" --quiet
  echo "  $(tail -n 1 "$LOG")"
fi

step "3. LMDBs, mean and labels -> $LMDB"
if [ -f "$LMDB/manifest.json" ]; then
  echo "  already there (delete $LMDB to rebuild)"
else
  quiet "$PY" tools/make_lmdb.py "$SAMPLE" "$LMDB" --quiet
  echo "  $(grep '^wrote ' "$LOG" | tail -n 1)"
fi
quiet "$PY" tools/lmdb_info.py "$LMDB/val_lmdb" --keys 3 --sheet "$LMDB/val_sheet.png"

step "4. prototxt for the 'tiny' variant, CPU, sample-sized -> $RUN/prototxt, checked by Caffe"
# test_iter covers the val LMDB named by --lmdb-dir; the class count comes from its labels.txt.
quiet "$PY" tools/gen_prototxt.py --variants tiny --out "$RUN/prototxt" --lmdb-dir "$LMDB" --mode cpu \
  --max-iter "$ITERS" --test-interval "$((ITERS / 3))"
quiet "$PY" tools/gen_prototxt.py --check "$RUN/prototxt/tiny/train_val.prototxt" "$RUN/prototxt/tiny/deploy.prototxt"
echo "  $(tail -n 1 "$LOG")"

step "5. a short CPU training of 'tiny' with scripts/train.sh ($ITERS iterations) -> $RUN/runs/tiny/"
set +e
scripts/train.sh "$RUN/prototxt/tiny/solver.prototxt" --gpu cpu --runs-root "$RUN/runs" 2>&1 | tee -a "$LOG" \
  | grep -v '^\[train\] next:'
TRAINED="${PIPESTATUS[0]}"
set -e
[ "$TRAINED" -eq 0 ] || { echo "[quickstart] error: training failed (see above; all output: $LOG)" >&2; exit 1; }
RUN_DIR="$(ls -d "$RUN"/runs/tiny/* | tail -1)"
CLASSES="$(wc -l < "$LMDB/labels.txt")"
WEIGHTS="$RUN_DIR/snapshots/tiny_iter_$ITERS.caffemodel"

step "6. evaluation on val (center crop, 10 crops), the validated submission, pictures, report"
quiet "$PY" tools/evaluate.py --deploy "$RUN_DIR/deploy.prototxt" --weights "$WEIGHTS" --lmdb "$LMDB/val_lmdb" --quiet
CENTER="$(grep 'tta center' "$LOG" | tail -n 1 | sed 's/.*): //')"
quiet "$PY" tools/evaluate.py --deploy "$RUN_DIR/deploy.prototxt" --weights "$WEIGHTS" --lmdb "$LMDB/val_lmdb" \
  --tta 10crop --quiet
CROPS="$(grep 'tta 10crop' "$LOG" | tail -n 1 | sed 's/.*): //')"
echo "  center crop: $CENTER"
echo "  10 crops:    $CROPS"
quiet "$PY" tools/make_submission.py --model "$RUN_DIR/deploy.prototxt" "$WEIGHTS" --lmdb "$LMDB/test_lmdb" \
  --out "$RUN/submission.txt" --top5-csv "$RUN/top5.csv" --quiet
quiet "$PY" tools/make_submission.py --validate "$RUN/submission.txt" --lmdb "$LMDB/test_lmdb"
echo "  $(tail -n 1 "$LOG")"
quiet "$PY" tools/visualize.py --deploy "$RUN_DIR/deploy.prototxt" --weights "$WEIGHTS" --lmdb "$LMDB/val_lmdb"
quiet "$PY" tools/classify.py "$SAMPLE/val/images/val_0.JPEG" --model "$RUN_DIR/deploy.prototxt" "$WEIGHTS" --top 1
echo "  classify.py val_0.JPEG: $(tail -n 1 "$LOG" | sed 's/^ *1\. //')"

TOP1="${CENTER%%  top-5*}"
step "done in $((SECONDS - T0)) s: val ${TOP1} after $ITERS iterations (chance $(awk "BEGIN{printf \"%.2f\", 1/$CLASSES}"))"
cat <<EOF
  run dir    $RUN_DIR
             caffe.log, run.json, curves.png, snapshots/, eval_center.json, per_class_center.csv,
             filters.png, features_*.png, report.md
  submission $RUN/submission.txt (validated; top-5 per image: $RUN/top5.csv)
  all output $LOG
next:
  scripts/train.sh $RUN/prototxt/tiny/solver.prototxt --gpu cpu --max-iter $((ITERS * 2)) --runs-root $RUN/runs
      train twice as long (the run dir's solver.prototxt records --max-iter)
  .venv/bin/python tools/classify.py $SAMPLE/test/images --model $RUN_DIR/deploy.prototxt $WEIGHTS --top 1
      classify any JPEG or PNG files
  README.md, "Walk-through on the real Tiny ImageNet": the same steps on the real data
EOF
