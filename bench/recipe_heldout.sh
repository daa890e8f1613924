#!/usr/bin/env bash
# --recipe paper vs --recipe modern on held-out data (issue 26): a dataset in the Tiny ImageNet
# layout that no default was tuned on (random-colour shapes, seed 11: another generator style and
# seed than the quickstart's sample), 10 classes, 3,000 train / 200 val, batch 32 (an epoch is
# ~94 iterations). Each line: variant, recipe, seed, iterations, val top-1 at the end, seconds.
# A spec is VARIANT:RECIPE[:GEN_FLAGS], GEN_FLAGS comma-separated (resnet_tiny:modern:--cutmix=1).
#
#   bench/recipe_heldout.sh [--iters 800] [--seeds "0 1 2"] [--specs "tiny:paper resnet_tiny:paper resnet_tiny:modern"]
#   (OUT=/tmp/recipe_heldout by default: the data, nets and runs go there)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="$REPO/.venv/bin/python"
OUT="${OUT:-/tmp/recipe_heldout}"
ITERS=800; SEEDS="0 1 2"; SPECS="tiny:paper resnet_tiny:paper resnet_tiny:modern"
while [ $# -gt 0 ]; do
  case "$1" in
    --iters) ITERS="$2"; shift ;;
    --seeds) SEEDS="$2"; shift ;;
    --specs) SPECS="$2"; shift ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "recipe_heldout.sh: error: unknown option '$1' (valid: --iters N, --seeds LIST, --specs LIST)" >&2; exit 2 ;;
  esac
  shift
done
[ -d "$OUT/ds" ] || "$PY" tools/make_sample_data.py "$OUT/ds" --classes 10 --train 300 --val 20 --test 2 --seed 11 \
  --colours random --quiet
[ -d "$OUT/lmdb" ] || "$PY" tools/make_lmdb.py "$OUT/ds" "$OUT/lmdb" --quiet > /dev/null
for seed in $SEEDS; do
  for spec in $SPECS; do
    IFS=: read -r variant recipe flags <<< "$spec"
    tag="${variant}_${recipe}${flags:+_${flags//[^a-z0-9.]/}}_${ITERS}_s${seed}"
    # shellcheck disable=SC2086
    "$PY" tools/gen_prototxt.py --variants "$variant" --out "$OUT/p_$tag" --lmdb-dir "$OUT/lmdb" --mode cpu \
      --recipe "$recipe" --max-iter "$ITERS" --test-interval "$((ITERS / 4))" --seed "$seed" ${flags//,/ } > /dev/null
    start=$SECONDS
    scripts/train.sh "$OUT/p_$tag/$variant/solver.prototxt" --gpu cpu --run-dir "$OUT/runs/$tag" > /dev/null 2>&1
    top1="$("$PY" -c 'import json,sys; print("%.3f" % json.load(open(sys.argv[1]))["final"]["accuracy_top1"])' \
      "$OUT/runs/$tag/run.json")"
    printf '%-12s %-7s %-22s seed %s  %5d it  val top-1 %s  %4d s\n' "$variant" "$recipe" "${flags:--}" "$seed" "$ITERS" "$top1" \
      "$((SECONDS - start))"
  done
done
