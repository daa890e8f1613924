#!/usr/bin/env bash
# The whole job on the embedded sample dataset, on CPU, from a clean clone:
# set-up -> sample data -> (LMDB -> prototxt -> training -> evaluation -> submission -> curves).
# Steps whose tools have not landed yet are listed at the end, not faked.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="$REPO/.venv/bin/python"
SAMPLE="data/sample/tiny-imagenet-200"

step() { printf '\n[quickstart] == %s\n' "$*"; }

step "1. set-up (Debian packages, Caffe 1.0 CPU build or cache, .venv) + Caffe self-check"
scripts/setup.sh --cpu

step "2. sample dataset in the Tiny ImageNet layout -> $SAMPLE"
if [ -f "$SAMPLE/wnids.txt" ]; then
  echo "already there (delete $SAMPLE to regenerate)"
else
  "$PY" tools/make_sample_data.py "$SAMPLE"
fi

done_steps=("set-up + Caffe self-check" "sample data in $SAMPLE")
todo_steps=()
for tool in make_lmdb gen_prototxt train evaluate make_submission plot_log; do
  [ -f "tools/$tool.py" ] || todo_steps+=("tools/$tool.py")
done

step "summary"
printf 'done:\n'; printf '  - %s\n' "${done_steps[@]}"
if [ ${#todo_steps[@]} -gt 0 ]; then
  printf 'not built yet (their issues are open), so not run:\n'; printf '  - %s\n' "${todo_steps[@]}"
fi
