#!/usr/bin/env bash
# The whole job on the embedded sample dataset, on CPU, from a clean clone:
# set-up -> sample data -> LMDB -> prototxt -> a short training (scripts/train.sh) with its
# curves -> evaluation -> the validated submission file -> filters, feature maps, report.
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
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "quickstart.sh: error: unknown option '$1' (valid: --iters N, --help)" >&2; exit 2 ;;
  esac
  shift
done

step() { printf '\n[quickstart] == %s\n' "$*"; }

step "1. set-up (Debian packages, Caffe 1.0: the active build, else the CPU one, .venv) + Caffe self-check"
scripts/setup.sh

step "2. sample dataset in the Tiny ImageNet layout -> $SAMPLE"
if [ -f "$SAMPLE/wnids.txt" ]; then
  echo "already there (delete $SAMPLE to regenerate)"
else
  "$PY" tools/make_sample_data.py "$SAMPLE"
fi

step "3. LMDBs, mean and labels -> $LMDB"
if [ -f "$LMDB/manifest.json" ]; then
  echo "already there (delete $LMDB to rebuild)"
else
  "$PY" tools/make_lmdb.py "$SAMPLE" "$LMDB"
fi
"$PY" tools/lmdb_info.py "$LMDB/val_lmdb" --keys 3 --sheet "$LMDB/val_sheet.png"

step "4. prototxt for the 'tiny' variant, CPU, sample-sized -> $RUN/prototxt"
VAL_SIZE="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["splits"]["val"]["count"])' "$LMDB/manifest.json")"
"$PY" tools/gen_prototxt.py --variants tiny --out "$RUN/prototxt" --lmdb-dir "$LMDB" --labels "$LMDB/labels.txt" \
  --val-size "$VAL_SIZE" --mode cpu --max-iter "$ITERS" --test-interval "$((ITERS / 3))"
"$PY" tools/gen_prototxt.py --check "$RUN/prototxt/tiny/train_val.prototxt" "$RUN/prototxt/tiny/deploy.prototxt" | tail -1

step "5. a short CPU training of 'tiny' with scripts/train.sh ($ITERS iterations) -> $RUN/runs/tiny/"
scripts/train.sh "$RUN/prototxt/tiny/solver.prototxt" --gpu cpu --runs-root "$RUN/runs"
RUN_DIR="$(ls -d "$RUN"/runs/tiny/* | tail -1)"
TOP1="$("$PY" -c 'import json,sys; print("%.3f" % json.load(open(sys.argv[1]))["final"]["accuracy_top1"])' "$RUN_DIR/run.json")"
CLASSES="$(wc -l < "$LMDB/labels.txt")"
"$PY" tools/report.py "$RUN/runs"

step "6. evaluation on val (center crop and 10 crops), the validated submission file, pictures and report"
WEIGHTS="$RUN_DIR/snapshots/tiny_iter_$ITERS.caffemodel"
"$PY" tools/evaluate.py --deploy "$RUN_DIR/deploy.prototxt" --weights "$WEIGHTS" --lmdb "$LMDB/val_lmdb" \
  --mean "$LMDB/mean.binaryproto" --quiet
"$PY" tools/evaluate.py --deploy "$RUN_DIR/deploy.prototxt" --weights "$WEIGHTS" --lmdb "$LMDB/val_lmdb" \
  --mean "$LMDB/mean.binaryproto" --tta 10crop --quiet | head -1
"$PY" tools/make_submission.py --model "$RUN_DIR/deploy.prototxt" "$WEIGHTS" --lmdb "$LMDB/test_lmdb" \
  --mean "$LMDB/mean.binaryproto" --out "$RUN/submission.txt" --top5-csv "$RUN/top5.csv"
"$PY" tools/make_submission.py --validate "$RUN/submission.txt" --lmdb "$LMDB/test_lmdb"
"$PY" tools/visualize.py --deploy "$RUN_DIR/deploy.prototxt" --weights "$WEIGHTS" --lmdb "$LMDB/val_lmdb" \
  --mean "$LMDB/mean.binaryproto"

done_steps=("set-up + Caffe self-check" "sample data in $SAMPLE" "LMDBs in $LMDB (contact sheet $LMDB/val_sheet.png)"
            "prototxt in $RUN/prototxt, checked by Caffe"
            "training: val top-1 $TOP1 after $ITERS iterations (chance $(awk "BEGIN{printf \"%.2f\", 1/$CLASSES}"))"
            "run dir $RUN_DIR: caffe.log, run.json, snapshots/, curves.png (train loss, val top-1/top-5, LR)"
            "evaluation: $RUN_DIR/eval_center.json, per_class_center.csv (and 10crop)"
            "submission: $RUN/submission.txt (validated), top-5: $RUN/top5.csv"
            "pictures and report: $RUN_DIR/filters.png, features_*.png, report.md")

step "summary"
printf 'done:\n'; printf '  - %s\n' "${done_steps[@]}"
