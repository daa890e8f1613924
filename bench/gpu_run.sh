#!/usr/bin/env bash
# The GPU issue's one prepared run: everything a GPU machine must prove, in one script.
#
#   bench/gpu_run.sh --prepare   on the build machine: packs the CUDA Caffe, the small wheels
#                                tinycaffe needs beyond what a PyTorch machine has, and the
#                                sample LMDBs + prototxt into dist/gpu-run/ (print: size, carry)
#   bench/gpu_run.sh             on the GPU machine (driver, Python 3, PyTorch; no Debian -dev
#                                packages, no network), from the repo root:
#                                 1. unpack the bundle, check.sh, nvidia-smi, caffe device_query
#                                 2. bench/bench_gpu.py: caffe time -gpu 0 vs the same nets in
#                                    PyTorch, batch 128 -> bench/results/gpu-<card>-<date>.json
#                                 3. a short scripts/train.sh tiny --gpu 0 on the sample data
#                                    (falls back to `caffe train -gpu 0` if tinycaffe's Python
#                                    dependencies cannot be had there, and says so)
#                                Everything is logged to $OUT (or bench/results/gpu-run/).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PACK="dist/gpu-run"
ITERS="${GPU_RUN_ITERS:-300}"   # the short training: iterations of tiny on the sample data
log() { printf '[gpu_run] %s\n' "$*"; }
die() { printf '[gpu_run] error: %s\n' "$*" >&2; exit 1; }

prepare() {
  local home="${TINYCAFFE_HOME:-$HOME/.cache/tinycaffe}" py=.venv/bin/python
  [ -f "$home/caffe-1.0-cuda/.tinycaffe-build" ] || die "no CUDA build in $home: scripts/install_caffe.sh --cuda --arch 90"
  [ -x "$py" ] || die "no .venv: scripts/setup.sh first"
  rm -rf "$PACK" && mkdir -p "$PACK/wheels"
  scripts/pack_caffe.sh --prefix "$home/caffe-1.0-cuda" --out "$PACK/caffe-1.0-cuda.tar.xz"
  # Pure or tiny wheels for each Python a GPU machine may run; numpy comes with PyTorch.
  local v
  for v in 3.10 3.11 3.12 3.13; do
    "$py" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version "$v" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      -d "$PACK/wheels" "protobuf>=4.21,<8" "lmdb>=1.4,<3" "tqdm>=4.66,<5" "six>=1.16,<2" 2>&1 | grep -v '^WARNING: Location' || true
  done
  # The sample data as LMDBs (the GPU machine lacks Pillow maybe, and needs no generator).
  "$py" tools/make_sample_data.py "$PACK/sample" >/dev/null
  "$py" tools/make_lmdb.py "$PACK/sample" "$PACK/lmdb" >/dev/null
  rm -rf "$PACK/sample"
  local val; val="$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["splits"]["val"]["count"])' "$PACK/lmdb/manifest.json")"
  "$py" tools/gen_prototxt.py --variants tiny --out "$PACK/prototxt" --lmdb-dir "$PACK/lmdb" \
    --labels "$PACK/lmdb/labels.txt" --val-size "$val" --mode gpu --max-iter "$ITERS" --test-interval "$((ITERS / 3))" >/dev/null
  log "prepared $PACK: $(du -sm "$PACK" | cut -f1) MiB (bundle $(du -m "$PACK/caffe-1.0-cuda.tar.xz" | cut -f1) MiB)"
  log "carry: [\"$PACK\"]   command: bash bench/gpu_run.sh"
}

run_on_gpu() {
  [ -f "$PACK/caffe-1.0-cuda.tar.xz" ] || die "$PACK/caffe-1.0-cuda.tar.xz missing: run bench/gpu_run.sh --prepare here and carry $PACK"
  local out="${OUT:-bench/results/gpu-run}" work
  mkdir -p "$out"
  out="$(cd "$out" && pwd)"
  exec > >(tee "$out/gpu_run.log") 2>&1
  work="$(mktemp -d)"
  tar -xf "$PACK/caffe-1.0-cuda.tar.xz" -C "$work"
  local bundle="$work/caffe-1.0-cuda"
  # shellcheck disable=SC1091
  source "$bundle/env.sh"
  log "1. bundle, driver, device"
  cat "$bundle/MANIFEST.txt"
  nvidia-smi || true
  # A CUDA 13 build needs a driver that supports CUDA 13 (>= 580); say so up front.
  local driver_cuda build_cuda
  driver_cuda="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)"
  build_cuda="$(sed -n 's/.* cuda=\([0-9.]*\) .*/\1/p' "$bundle/MANIFEST.txt" | head -1)"
  log "driver supports CUDA ${driver_cuda:-?}; the bundle is built with CUDA ${build_cuda:-?}"
  if [ -n "$driver_cuda" ] && [ -n "$build_cuda" ] && [ "${driver_cuda%%.*}" -lt "${build_cuda%%.*}" ]; then
    log "warning: this driver is too old for the bundle's CUDA: Caffe will not run on the GPU here;" \
        "a CUDA ${driver_cuda%%.*} build is needed (scripts/cuda-libs/cu${driver_cuda%%.*}.txt + that toolkit's nvcc)"
  fi
  "$bundle/check.sh" || log "check.sh found something missing (above); going on to see what still runs"
  caffe device_query -gpu 0 2>&1 | sed -n 's/.*] //p'

  # tinycaffe's view of this Caffe: a location file saying it is the CUDA flavour.
  export TINYCAFFE_HOME="$work/home" CAFFE_BIN="$bundle/bin/caffe"
  mkdir -p "$TINYCAFFE_HOME"
  printf 'CAFFE_ROOT=%s\nCAFFE_BIN=%s\nPYCAFFE_DIR=%s\nCAFFE_FLAVOUR=cuda\n' \
    "$bundle" "$bundle/bin/caffe" "$bundle/python" > "$TINYCAFFE_HOME/caffe.env"
  local venv="$work/venv"
  python3 -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install -q --no-index --find-links "$PACK/wheels" protobuf lmdb tqdm six \
    || log "pip could not install tinycaffe's small dependencies from $PACK/wheels"
  cp "$bundle/MANIFEST.txt" "$out/"

  log "2. Caffe vs PyTorch, same nets, batch 128"
  "$venv/bin/python" bench/bench_gpu.py --gpu 0 --out "$out/gpu-$(date +%F).json" \
    || log "bench_gpu.py failed (above)"
  cp "$out"/gpu-*.json bench/results/ 2>/dev/null || true

  log "3. a short training of tiny on the sample data, GPU 0 ($ITERS iterations)"
  mkdir -p .venv/bin && ln -sf "$venv/bin/python" .venv/bin/python   # what scripts/train.sh runs
  if scripts/train.sh "$PACK/prototxt/tiny/solver.prototxt" --gpu 0 --runs-root "$out/runs"; then
    log "train.sh finished: $(ls -d "$out"/runs/tiny/* | tail -1)"
  else
    log "train.sh could not run here; the same solver through the caffe binary:"
    (cd "$REPO" && caffe train -solver "$PACK/prototxt/tiny/solver.prototxt" -gpu 0) 2>&1 | tee "$out/caffe_train.log" \
      | grep -E "Iteration [0-9]+, loss|accuracy|Optimization Done" || true
  fi
  log "results in $out"
}

case "${1:-}" in
  --prepare) prepare ;;
  "") run_on_gpu ;;
  *) die "unknown option '$1' (valid: --prepare, or nothing on the GPU machine)" ;;
esac
