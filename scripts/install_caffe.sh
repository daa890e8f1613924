#!/usr/bin/env bash
# Build BVLC Caffe 1.0 + pycaffe from Debian's bullseye source package into a
# versioned prefix outside the repo, then self-check it.
#
#   scripts/install_caffe.sh [--cpu|--cuda] [--arch "80 90"] [--no-cudnn]
#                            [--python PY] [--jobs N] [--force]
#   scripts/install_caffe.sh --opencv-tools [--jobs N] [--force]
#
# Flavours: --cpu (caffe-1.0-cpu) or --cuda (caffe-1.0-cuda: CUDA 12/13, cuDNN 8/9,
# NCCL). Neither: keep the flavour that is active now (a GPU box stays GPU), else CPU.
#
# --opencv-tools: the same source and patches built on the CPU with OpenCV and without
# pycaffe, into $TINYCAFFE_HOME/caffe-1.0-cpu-opencv, for Caffe's own convert_imageset and
# compute_image_mean as bench/bench_make_lmdb.py's anchor (convert_imageset reads JPEGs only
# through OpenCV). It is never activated: tinycaffe keeps using the flavour above.
#
# Environment:
#   TINYCAFFE_HOME  cache root (default $HOME/.cache/tinycaffe); builds land in
#                   $TINYCAFFE_HOME/caffe-1.0-cpu and caffe-1.0-cuda
#   CAFFE_SRC       use this Caffe source tree instead of `apt-get source`
#                   (it is copied, never patched in place)
#   CAFFE_ROOT      use an existing Caffe install/build; nothing is built
#   CAFFE_JOBS      parallel compile jobs (default: nproc)
#   CUDA_HOME       CUDA toolkit (default: the one of the nvcc on PATH, or /usr/local/cuda)
#   CUDA_ARCH_BIN   GPU architectures (same as --arch; default: those this nvcc supports
#                   among 75 80 86 89 90, plus PTX of the newest for later cards)
#   CUDA_LIBS       where cuBLAS, cuRAND, cuDNN, NCCL come from: auto (the toolkit or
#                   system when there, else PyPI wheels), system, wheels (default auto)
#
# Idempotent: a prefix whose build stamp matches (flavour, Python X.Y, patches,
# and for CUDA: toolkit, architectures, libraries) is reused. A failed build
# leaves no prefix behind: the install is staged with DESTDIR and renamed into
# place only after it completed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CAFFE_DEB_VERSION="1.0.0+git20180821.99bd997-8"   # the last Debian release (bullseye)
CAFFE_DEB_SUITE="bullseye"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# CI runners and cron may start without HOME: take the account's home directory then.
HOME="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
export HOME
TINYCAFFE_HOME="${TINYCAFFE_HOME:-$HOME/.cache/tinycaffe}"

# Debian packages the CPU build needs (headers, protoc, cmake, and dpkg-source).
BUILD_DEPS=(cmake g++ make patch dpkg-dev pkg-config debian-archive-keyring
  libboost-system-dev libboost-thread-dev libboost-filesystem-dev libboost-python-dev
  libgoogle-glog-dev libgflags-dev libprotobuf-dev protobuf-compiler
  libhdf5-dev liblmdb-dev libsnappy-dev libopenblas-dev
  libopenblas0-openmp
  libdnnl-dev)  # oneDNN: patch 0019 runs the CPU convolutions in it (its CMake config is what Caffe looks for)
# What --opencv-tools adds: OpenCV's decoders, which Caffe's io.cpp (and so convert_imageset) uses.
OPENCV_DEPS=(libopencv-dev)  # its OpenCVConfig.cmake is what Caffe's CMake looks for
# The CPU flavour links OpenBLAS's OpenMP build, by path (RUNPATH points libcaffe at it, so the
# system's alternatives choice does not matter): patch 0011 runs Caffe's CPU layers on OpenMP
# threads, and inside those threads this OpenBLAS computes on one thread instead of starting
# its own pthreads pool under them. bench/bench_cpu.py measures it against PyTorch.
openmp_openblas() {  # Debian's multiarch path (dpkg-architecture, from dpkg-dev: not the gcc on PATH)
  local lib
  lib="/usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH)/openblas-openmp/libopenblas.so.0"
  [ -e "$lib" ] || die "no $lib: install Debian's libopenblas0-openmp (apt-get install -y libopenblas0-openmp)"
  printf '%s\n' "$lib"
}
# Modules pycaffe imports at `import caffe` (plus numpy for the build itself); patch
# 0007 made scikit-image and scipy optional (only caffe.io's image loading uses them).
PY_MODULES=(numpy six google.protobuf)

log() { printf '[install_caffe] %s\n' "$*"; }
die() { printf '[install_caffe] error: %s\n' "$*" >&2; exit 1; }

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

FLAVOUR=""        # cpu | cuda; empty = keep the active one, else cpu
PYTHON_BIN="${PYTHON:-}"
JOBS="${CAFFE_JOBS:-$(nproc)}"
FORCE=0
OPENCV_TOOLS=0    # --opencv-tools: the bench's anchor build (above), nothing activated
USE_CUDNN=ON      # --no-cudnn: Caffe's own convolution kernels (for comparison)
ARCH_BIN="${CUDA_ARCH_BIN:-}"
CUDA_LIBS="${CUDA_LIBS:-auto}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) FLAVOUR=cpu ;;
    --cuda) FLAVOUR=cuda ;;
    --arch) ARCH_BIN="${2:?--arch needs a list such as \"80 90\"}"; shift ;;
    --no-cudnn) USE_CUDNN=OFF ;;
    --python) PYTHON_BIN="${2:?--python needs an interpreter path}"; shift ;;
    --jobs) JOBS="${2:?--jobs needs a number}"; shift ;;
    --force) FORCE=1 ;;
    --opencv-tools) OPENCV_TOOLS=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (valid: --cpu, --cuda, --arch LIST, --no-cudnn, --python PY, --jobs N, --force, --opencv-tools, --help)" ;;
  esac
  shift
done
if [ "$OPENCV_TOOLS" -eq 1 ]; then
  [ -z "$FLAVOUR" ] || [ "$FLAVOUR" = cpu ] || die "--opencv-tools builds the CPU flavour only: drop --$FLAVOUR"
  [ -z "$ARCH_BIN" ] || [ -n "${CUDA_ARCH_BIN:-}" ] || die "--opencv-tools builds the CPU flavour only: drop --arch"
  [ "$USE_CUDNN" = ON ] || die "--opencv-tools builds the CPU flavour only: drop --no-cudnn"
  FLAVOUR=cpu
fi
case "$CUDA_LIBS" in auto|system|wheels) ;; *) die "CUDA_LIBS=$CUDA_LIBS (valid: auto, system, wheels)" ;; esac
if [ "$FLAVOUR" != cuda ] && { [ -n "$ARCH_BIN" ] && [ -z "${CUDA_ARCH_BIN:-}" ] || [ "$USE_CUDNN" = OFF ]; }; then
  die "--arch and --no-cudnn are options of the CUDA flavour: add --cuda"
fi

KEEP_ACTIVE=0     # 1: no flavour asked and the active build is reused as it is
choose_flavour() {
  [ -n "$FLAVOUR" ] && return 0
  # Keep what is active: `setup.sh` and the test command must not switch a GPU
  # box back to the CPU build. A fresh machine gets CPU unless --cuda is asked.
  local active
  active="$(sed -n 's/^CAFFE_FLAVOUR=//p' "$TINYCAFFE_HOME/caffe.env" 2>/dev/null || true)"
  if [ "$active" = cuda ] && [ -z "${CAFFE_ROOT:-}" ] && [ -f "$TINYCAFFE_HOME/caffe-1.0-cuda/.tinycaffe-build" ]; then
    FLAVOUR=cuda KEEP_ACTIVE=1
    log "keeping the active CUDA build (pass --cpu or --cuda to choose)"
    return 0
  fi
  FLAVOUR=cpu
  if command -v nvcc >/dev/null 2>&1; then
    log "note: nvcc found; this builds the CPU flavour. Pass --cuda for caffe-1.0-cuda."
  fi
}

# ---------------------------------------------------------------- Python
py_missing_modules() {  # prints the modules $1 cannot import
  local py="$1" m
  for m in "${PY_MODULES[@]}"; do
    "$py" -c "import $m" >/dev/null 2>&1 || printf '%s ' "$m"
  done
}

choose_python() {
  [ -n "$PYTHON_BIN" ] || PYTHON_BIN="$(command -v python3 || true)"
  [ -x "$PYTHON_BIN" ] || PYTHON_BIN="$(command -v "$PYTHON_BIN" || true)"
  [ -n "$PYTHON_BIN" ] || die "no python3 found; pass --python /path/to/python3"
  # Absolute, but not symlink-resolved: a venv's python is a symlink to its base.
  PYTHON_BIN="$(cd "$(dirname "$PYTHON_BIN")" && pwd)/$(basename "$PYTHON_BIN")"
  local missing; missing="$(py_missing_modules "$PYTHON_BIN")"
  if [ -n "$missing" ]; then
    # A private venv keeps the user's interpreter untouched; same base Python, so
    # the pycaffe built against it imports from any venv of that interpreter.
    local venv="$TINYCAFFE_HOME/pyenv-$("$PYTHON_BIN" -c 'import sys;print("%d.%d"%sys.version_info[:2])')"
    log "$PYTHON_BIN lacks: $missing-> using helper venv $venv"
    [ -x "$venv/bin/python" ] || "$PYTHON_BIN" -m venv "$venv"
    "$venv/bin/pip" install -q -r "$REPO/requirements.txt"
    PYTHON_BIN="$venv/bin/python"
  fi
  PY_VERSION="$("$PYTHON_BIN" -c 'import sys;print("%d.%d"%sys.version_info[:2])')"
}

python_cmake_args() {
  # Taken from the interpreter that will import caffe: CMake otherwise finds
  # Debian's libpython even when another 3.X runs the code.
  "$PYTHON_BIN" - <<'EOF'
import os, sysconfig
inc = sysconfig.get_paths()["include"]
libdir = sysconfig.get_config_var("LIBDIR") or ""
ldlib = sysconfig.get_config_var("LDLIBRARY") or ""
lib = os.path.join(libdir, ldlib)
if not os.path.exists(lib):  # static-only interpreters: fall back to the .so next to it
    lib = os.path.join(libdir, "libpython%s.so" % sysconfig.get_config_var("VERSION"))
print("-DPYTHON_INCLUDE_DIR=%s -DPYTHON_LIBRARY=%s" % (inc, lib))
EOF
}

# ---------------------------------------------------------------- CUDA
CUDA_KNOWN_ARCHS=(75 80 86 89 90)  # Turing, Ampere (A100, RTX 30), A10/RTX 30, Ada (L4, RTX 40), Hopper (H100)
# library -> header that proves it is there
declare -A CUDA_LIB_HEADER=([cublas]=cublas_v2.h [curand]=curand.h [cudnn]=cudnn.h [nccl]=nccl.h)

find_cuda() {  # sets CUDA_HOME, CUDA_VERSION, CUDA_MAJOR, NVCC
  NVCC=""
  if [ -n "${CUDA_HOME:-}" ]; then
    [ -x "$CUDA_HOME/bin/nvcc" ] || die "CUDA_HOME=$CUDA_HOME: no bin/nvcc there (expected a CUDA toolkit)"
    NVCC="$CUDA_HOME/bin/nvcc"
  else
    NVCC="$(command -v nvcc || true)"
    [ -n "$NVCC" ] || { [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc; } \
      || die "--cuda: no nvcc (PATH, /usr/local/cuda/bin); install a CUDA 12 or 13 toolkit or set CUDA_HOME"
    # nvcc on PATH may be a wrapper script: nvcc itself says where its toolkit is.
    local here
    here="$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -1)"
    CUDA_HOME="$(cd "${here:-$(dirname "$(readlink -f "$NVCC")")}/.." && pwd)"
    NVCC="$CUDA_HOME/bin/nvcc"
  fi
  CUDA_VERSION="$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p')"
  CUDA_MAJOR="${CUDA_VERSION%%.*}"
  case "$CUDA_MAJOR" in
    12|13) ;;
    *) die "$NVCC is CUDA ${CUDA_VERSION:-of unknown version}; this build supports CUDA 12 and 13" ;;
  esac
}

choose_archs() {  # sets ARCH_BIN (space separated) and ARCH_PTX
  local supported
  supported=" $("$NVCC" --list-gpu-code 2>/dev/null | sed -n 's/^sm_\([0-9]*\)$/\1/p' | tr '\n' ' ')"
  if [ -z "$ARCH_BIN" ]; then
    local a
    for a in "${CUDA_KNOWN_ARCHS[@]}"; do
      case "$supported" in *" $a "*) ARCH_BIN="${ARCH_BIN:+$ARCH_BIN }$a" ;; esac
    done
  fi
  ARCH_BIN="$(echo "$ARCH_BIN" | tr ',;' '  ' | xargs -n1 | sort -n -u | xargs)"
  [ -n "$ARCH_BIN" ] || die "no GPU architecture to build for (nvcc supports:$supported)"
  local arch
  for arch in $ARCH_BIN; do
    case "$supported" in
      *" $arch "*) ;;
      *) die "--arch $arch: CUDA $CUDA_VERSION's nvcc cannot build sm_$arch (valid:$supported)" ;;
    esac
  done
  ARCH_PTX="${ARCH_BIN##* }"  # PTX of the newest: later cards JIT-compile it
}

system_lib_dirs() {  # $1 = library name -> "include-dir lib-dir" of a system copy, or nothing
  local name="$1" inc lib
  for inc in "$CUDA_HOME/include" /usr/include /usr/local/include /usr/include/x86_64-linux-gnu; do
    [ -f "$inc/${CUDA_LIB_HEADER[$name]}" ] || continue
    for lib in "$CUDA_HOME/lib64" "$CUDA_HOME/lib" /usr/lib/x86_64-linux-gnu /usr/local/lib /usr/lib64; do
      compgen -G "$lib/lib$name.so*" >/dev/null && { printf '%s %s\n' "$inc" "$lib"; return 0; }
    done
  done
  return 1
}

install_cuda_wheels() {  # $1 = target dir; the pinned wheels of scripts/cuda-libs/cu$CUDA_MAJOR.txt
  local target="$1" pins="$REPO/scripts/cuda-libs/cu$CUDA_MAJOR.txt" want
  want="$(sha256sum < "$pins" | cut -c1-16)"
  [ -f "$target/.pins" ] && [ "$(cat "$target/.pins")" = "$want" ] && return 0
  log "CUDA libraries from PyPI wheels ($(basename "$pins")) -> $target (about 1 GB)"
  rm -rf "$target.tmp"
  "$PYTHON_BIN" -m pip install -q --disable-pip-version-check --no-deps --target "$target.tmp" -r "$pins" \
    || die "pip could not install the CUDA wheels of $pins"
  rm -rf "$target"
  mv "$target.tmp" "$target"
  printf '%s\n' "$want" > "$target/.pins"
}

wheel_lib_dirs() {  # $1 = wheels dir, $2 = library name -> "include-dir lib-dir"
  local header inc
  header="$(find "$1/nvidia" -name "${CUDA_LIB_HEADER[$2]}" -path '*/include/*' | head -1)"
  [ -n "$header" ] || return 1
  inc="$(dirname "$header")"
  compgen -G "$inc/../lib/lib$2.so*" >/dev/null || return 1
  printf '%s %s\n' "$inc" "$(cd "$inc/../lib" && pwd)"
}

prepare_cuda_libs() {  # sets CUDA_LIBS_DIR: one include/ + lib/ view of the four libraries
  CUDA_LIBS_DIR="$TINYCAFFE_HOME/cuda$CUDA_MAJOR-libs"
  local wheels="$CUDA_LIBS_DIR/wheels" name dirs need_wheels=0
  declare -gA CUDA_LIB_DIRS=() CUDA_LIB_SOURCE=()
  for name in cublas curand cudnn nccl; do
    if [ "$CUDA_LIBS" != wheels ] && dirs="$(system_lib_dirs "$name")"; then
      CUDA_LIB_DIRS[$name]="$dirs" CUDA_LIB_SOURCE[$name]=system
    elif [ "$CUDA_LIBS" = system ]; then
      [ "$name" = nccl ] && { CUDA_LIB_SOURCE[$name]=none; continue; }  # optional: one GPU only
      die "CUDA_LIBS=system: no $name (${CUDA_LIB_HEADER[$name]}) under $CUDA_HOME or /usr; use CUDA_LIBS=wheels"
    else
      need_wheels=1 CUDA_LIB_SOURCE[$name]=wheel
    fi
  done
  [ "$need_wheels" -eq 1 ] && install_cuda_wheels "$wheels"
  # The view: symlinks in one include/ and one lib/, so CMake gets one path per
  # kind and libcaffe one RUNPATH entry, wherever each library came from.
  rm -rf "${CUDA_LIBS_DIR:?}/include" "${CUDA_LIBS_DIR:?}/lib"
  mkdir -p "$CUDA_LIBS_DIR/include" "$CUDA_LIBS_DIR/lib"
  for name in cublas curand cudnn nccl; do
    case "${CUDA_LIB_SOURCE[$name]}" in
      wheel) dirs="$(wheel_lib_dirs "$wheels" "$name")" || die "the $name wheel has no ${CUDA_LIB_HEADER[$name]} + lib$name.so" ;;
      system) dirs="${CUDA_LIB_DIRS[$name]}" ;;
      *) continue ;;
    esac
    link_lib_files "$name" ${dirs}
    log "  $name: ${CUDA_LIB_SOURCE[$name]} (${dirs#* })"
  done
}

link_lib_files() {  # $1 = name, $2 = include dir, $3 = lib dir
  local name="$1" inc="$2" lib="$3" f base
  for f in "$inc/$name"*.h; do
    [ -e "$f" ] && ln -sfn "$f" "$CUDA_LIBS_DIR/include/"
  done
  [ "$name" = cublas ] && for f in "$inc"/cublasLt*.h "$inc"/cublas_api.h; do [ -e "$f" ] && ln -sfn "$f" "$CUDA_LIBS_DIR/include/"; done
  [ "$name" = nccl ] && [ -d "$inc/nccl_device" ] && ln -sfn "$inc/nccl_device" "$CUDA_LIBS_DIR/include/"
  for f in "$lib/lib$name"*.so*; do
    [ -e "$f" ] || continue
    base="$(basename "$f")"
    ln -sfn "$f" "$CUDA_LIBS_DIR/lib/$base"
    # Wheels carry only the SONAME file (libcublas.so.13): the linker wants libcublas.so.
    [ -e "$CUDA_LIBS_DIR/lib/${base%%.so*}.so" ] || ln -sfn "$f" "$CUDA_LIBS_DIR/lib/${base%%.so*}.so"
  done
}

cuobjdump_bin() {  # the toolkit's cuobjdump, else the wheel's (installed with the CUDA libraries)
  local c
  for c in "$CUDA_HOME/bin/cuobjdump" "$(command -v cuobjdump || true)" \
           "$CUDA_LIBS_DIR/wheels/nvidia/cu$CUDA_MAJOR/bin/cuobjdump"; do
    [ -n "$c" ] && [ -x "$c" ] && { printf '%s\n' "$c"; return 0; }
  done
  return 1
}

cuda_cmake_args() {  # printed one per line
  local with_nccl=ON cccl=""
  [ "${CUDA_LIB_SOURCE[nccl]}" = none ] && with_nccl=OFF
  # CUDA 13 moved Thrust/CUB under include/cccl: nvcc knows, g++ (cudnn_softmax_layer.cpp) not.
  [ -d "$CUDA_HOME/include/cccl/thrust" ] && cccl="$CUDA_HOME/include/cccl"
  printf '%s\n' -DCPU_ONLY=OFF -DUSE_CUDNN="$USE_CUDNN" -DUSE_NCCL="$with_nccl" \
    -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" -DCUDA_ARCH_NAME=Manual \
    -DCUDA_ARCH_BIN="$ARCH_BIN" -DCUDA_ARCH_PTX="$ARCH_PTX" \
    -DCMAKE_LIBRARY_PATH="$CUDA_LIBS_DIR/lib" -DCMAKE_INCLUDE_PATH="$CUDA_LIBS_DIR/include" \
    -DCMAKE_CXX_FLAGS="-I$CUDA_LIBS_DIR/include${cccl:+ -I$cccl}" \
    -DCUDNN_INCLUDE="$CUDA_LIBS_DIR/include" -DCUDNN_LIBRARY="$CUDA_LIBS_DIR/lib/libcudnn.so" \
    -DNCCL_INCLUDE_DIR="$CUDA_LIBS_DIR/include" -DNCCL_LIBRARIES="$CUDA_LIBS_DIR/lib/libnccl.so" \
    "-DCUDA_NVCC_FLAGS=-I$CUDA_LIBS_DIR/include;-std=c++17"
  # C++17: CUDA 13's Thrust/CUB headers refuse older standards (nvcc only; g++ keeps its default).
}

# ---------------------------------------------------------------- system packages
ensure_build_deps() {  # [PACKAGE...]: these instead of all of BUILD_DEPS
  [ $# -gt 0 ] || set -- "${BUILD_DEPS[@]}"
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local cmd="apt-get install -y --no-install-recommends ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    printf '[install_caffe] missing Debian packages; run as root:\n  %s\n' "$cmd" >&2
    exit 1
  fi
  log "installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $cmd -qq >/dev/null
}

# ---------------------------------------------------------------- source
fetch_source() {  # $1 = work dir; leaves the tree in $1/src
  local work="$1"
  if [ -n "${CAFFE_SRC:-}" ]; then
    [ -f "$CAFFE_SRC/CMakeLists.txt" ] || die "CAFFE_SRC=$CAFFE_SRC: no CMakeLists.txt there (expected a Caffe source tree)"
    log "source: copy of $CAFFE_SRC"
    cp -a "$CAFFE_SRC" "$work/src"
    return
  fi
  # A private sources file and lists directory: the system's apt configuration
  # (which no longer knows bullseye) is never touched.
  local apt="$work/apt"
  mkdir -p "$apt/lists/partial" "$apt/sources.list.d"
  cat > "$apt/sources.list.d/caffe-src.sources" <<EOF
Types: deb-src
URIs: $DEBIAN_MIRROR
Suites: $CAFFE_DEB_SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  local opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$apt/sources.list.d"
              -o "Dir::State::Lists=$apt/lists" -o "APT::Sandbox::User=root" -qq)
  log "source: Debian caffe $CAFFE_DEB_VERSION ($CAFFE_DEB_SUITE) via apt-get source"
  apt-get "${opts[@]}" update
  (cd "$work" && apt-get "${opts[@]}" source --download-only "caffe=$CAFFE_DEB_VERSION")
  # dpkg-source also applies Debian's own quilt patches (boost-python naming, ...).
  # --no-check: apt-get already verified the files against the signed Sources
  # index; dpkg-source would only add a gpgv "no public key" warning.
  (cd "$work" && dpkg-source -q --no-check -x "caffe_${CAFFE_DEB_VERSION}.dsc" src >/dev/null)
}

# ---------------------------------------------------------------- Caffe's own example nets
# BVLC Caffe's examples/ and models/ prototxt files (LeNet, CIFAR-10 quick, GoogLeNet, ...), as
# the source package ships them: real third-party nets for the tests of --check and evaluate
# (tests/test_foreign_nets.py), kept beside the builds, never in this repository.
REFERENCE_DIR="$TINYCAFFE_HOME/caffe-reference"

copy_reference_files() {  # $1 = a Caffe source tree
  local tmp="$REFERENCE_DIR.tmp.$$"
  rm -rf "$tmp" && mkdir -p "$tmp"
  local d
  for d in examples models; do  # a CAFFE_SRC tree may lack them
    if [ -d "$1/$d" ]; then (cd "$1" && find "$d" -name '*.prototxt' -print0 | xargs -0 -r cp --parents -t "$tmp"); fi
  done
  printf 'BVLC Caffe examples/ and models/ *.prototxt from the Debian source package caffe %s (%s), unmodified.\n' \
    "$CAFFE_DEB_VERSION" "${CAFFE_SRC:-$DEBIAN_MIRROR}" > "$tmp/SOURCE"
  rm -rf "$REFERENCE_DIR" && mv "$tmp" "$REFERENCE_DIR"
  log "Caffe's example nets -> $REFERENCE_DIR"
}

ensure_reference_files() {  # a cached build made before they were kept: fetch the source once more
  [ -f "$REFERENCE_DIR/SOURCE" ] && return 0
  local work
  work="$(mktemp -d "$TINYCAFFE_HOME/reference.XXXXXX")"
  fetch_source "$work"
  copy_reference_files "$work/src"
  rm -rf "$work"
}

applied_patches() {  # $1 = source tree -> how many of the patches, from the first, it already holds
  # Later patches change lines of earlier ones (0019 inside 0011's convolution loop), so on a
  # tree that holds them all an early patch alone need not reverse: the first k are applied
  # when patches k, k-1, ..., 1 reverse one after the other, tried on a scratch copy from the
  # largest k whose own patch reverses on the tree.
  local patches=("$REPO"/scripts/patches/*.patch) k i scratch ok
  for ((k = ${#patches[@]}; k > 0; k--)); do
    patch -d "$1" -p1 -R --dry-run -s -f < "${patches[k - 1]}" >/dev/null 2>&1 || continue
    scratch="$(mktemp -d)"
    cp -a "$1/." "$scratch/"
    ok=1
    for ((i = k - 1; i >= 0; i--)); do
      patch -d "$scratch" -p1 -R -s -f < "${patches[i]}" >/dev/null 2>&1 || { ok=0; break; }
    done
    rm -rf "$scratch"
    if [ "$ok" -eq 1 ]; then echo "$k"; return; fi
  done
  echo 0
}

apply_patches() {  # $1 = source tree
  local patches=("$REPO"/scripts/patches/*.patch) applied i
  applied="$(applied_patches "$1")"
  for ((i = 0; i < ${#patches[@]}; i++)); do
    if [ "$i" -lt "$applied" ]; then
      log "patch already applied: $(basename "${patches[i]}")"
    else
      patch -d "$1" -p1 -s -f < "${patches[i]}" || die "patch $(basename "${patches[i]}") does not apply to this Caffe source"
      log "patched: $(basename "${patches[i]}")"
    fi
  done
}

# ---------------------------------------------------------------- build
build_stamp() {  # what must match for a cached prefix to be reused
  local extra=""
  if [ "$FLAVOUR" = cpu ]; then extra=" blas=openblas-openmp openmp=on"; fi
  if [ "$OPENCV_TOOLS" -eq 1 ]; then extra="$extra opencv=on pycaffe=off"; fi
  if [ "$FLAVOUR" = cuda ]; then
    extra=" cuda=$CUDA_VERSION arch=${ARCH_BIN// /,}+ptx$ARCH_PTX cudnn=$USE_CUDNN libs=$CUDA_LIBS"
    extra="$extra pins=$(sha256sum < "$REPO/scripts/cuda-libs/cu$CUDA_MAJOR.txt" | cut -c1-8)"
  fi
  printf 'flavour=%s python=%s caffe=%s patches=%s%s\n' "$FLAVOUR" "$PY_VERSION" \
    "${CAFFE_SRC:-debian-$CAFFE_DEB_VERSION}" "$(cat "$REPO"/scripts/patches/*.patch | sha256sum | cut -c1-16)" "$extra"
}

flavour_cmake_args() {  # printed one per line
  if [ "$FLAVOUR" = cuda ]; then
    cuda_cmake_args
  else
    printf '%s\n' -DCPU_ONLY=ON -DUSE_OPENMP=ON "-DOpenBLAS_LIB=$OPENMP_OPENBLAS"
  fi
  if [ "$OPENCV_TOOLS" -eq 1 ]; then
    printf '%s\n' -DUSE_OPENCV=ON -DBUILD_python=OFF
  else
    printf '%s\n' -DUSE_OPENCV=OFF -DBUILD_python=ON
  fi
}

build_caffe() {
  BUILD_WORK="$(mktemp -d "$TINYCAFFE_HOME/build-$FLAVOUR.XXXXXX")"
  local work="$BUILD_WORK"
  # Remove the scratch dir whatever happens; the prefix only appears on success.
  trap 'rm -rf "$BUILD_WORK"' EXIT
  local t0=$SECONDS
  fetch_source "$work"
  copy_reference_files "$work/src"
  apply_patches "$work/src"
  mkdir -p "$work/build"
  log "configuring (python $PYTHON_BIN, $JOBS jobs)"
  local flavour_args
  if [ "$FLAVOUR" = cpu ]; then OPENMP_OPENBLAS="$(openmp_openblas)"; fi  # dies here, not in cmake's link step
  mapfile -t flavour_args < <(flavour_cmake_args)
  # shellcheck disable=SC2046
  (cd "$work/build" && cmake ../src -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_INSTALL_PREFIX="$PREFIX" "${flavour_args[@]}" \
      -DUSE_LEVELDB=OFF -DUSE_LMDB=ON -DBLAS=Open -Dpython_version=3 -DBUILD_docs=OFF -DBUILD_matlab=OFF \
      -DPYTHON_EXECUTABLE="$PYTHON_BIN" $(python_cmake_args) > "$work/cmake.log" 2>&1) \
    || { tail -30 "$work/cmake.log" >&2; die "cmake configure failed (log above)"; }
  if [ "$FLAVOUR" = cuda ]; then
    log "compiling for sm_${ARCH_BIN// /, sm_} + PTX $ARCH_PTX, cuDNN $USE_CUDNN (on 2 cores: about 7 minutes for one architecture, 13 for five)"
  else
    log "compiling (this takes about 3 minutes on 2 cores)"
  fi
  (cd "$work/build" && make -j"$JOBS" > "$work/make.log" 2>&1) \
    || { grep -m20 -B2 -A5 'error' "$work/make.log" >&2 || tail -40 "$work/make.log" >&2; die "compile failed (errors above)"; }
  (cd "$work/build" && make install DESTDIR="$work/stage" > "$work/install.log" 2>&1) \
    || { tail -20 "$work/install.log" >&2; die "make install failed"; }
  build_stamp > "$work/stage$PREFIX/.tinycaffe-build"
  printf 'build_seconds=%s\n' "$((SECONDS - t0))" >> "$work/stage$PREFIX/.tinycaffe-build"
  rm -rf "$PREFIX"
  mkdir -p "$(dirname "$PREFIX")"
  mv "$work/stage$PREFIX" "$PREFIX"
  log "built in $((SECONDS - t0)) s -> $PREFIX"
}

# ---------------------------------------------------------------- locate + check
find_pycaffe_dir() {  # $1 = a Caffe install prefix or build tree
  local d
  for d in "$1/lib/python3/dist-packages" "$1/python" "$1/build/install/python"; do
    [ -f "$d/caffe/__init__.py" ] && { printf '%s\n' "$d"; return 0; }
  done
  return 1
}

find_caffe_bin() {
  local b
  for b in "$1/bin/caffe" "$1/build/tools/caffe" "$1/build/tools/caffe.bin" "$1/tools/caffe"; do
    [ -x "$b" ] && { printf '%s\n' "$b"; return 0; }
  done
  return 1
}

self_check() {
  local caffe_bin="$1" pydir="$2"
  log "self-check: $caffe_bin --version"
  "$caffe_bin" --version
  log "self-check: import caffe + NetSpec forward/backward on CPU"
  # A CUDA build on a machine without a GPU logs that cuBLAS/cuRAND handles cannot be
  # made (they are made at start-up, used only in GPU mode): expected, so not shown.
  local level=2
  [ "$FLAVOUR" = cuda ] && ! nvidia-smi -L >/dev/null 2>&1 && level=3
  PYTHONPATH="$pydir${PYTHONPATH:+:$PYTHONPATH}" GLOG_minloglevel=$level "$PYTHON_BIN" - <<'EOF'
import numpy as np
import caffe
from caffe import layers as L

caffe.set_mode_cpu()
n = caffe.NetSpec()
n.data, n.label = L.DummyData(shape=[dict(dim=[4, 3, 8, 8]), dict(dim=[4])],
                              data_filler=[dict(type="gaussian", std=1.0), dict(type="constant", value=1)],
                              ntop=2)
n.conv = L.Convolution(n.data, num_output=4, kernel_size=3, weight_filler=dict(type="xavier"))
n.fc = L.InnerProduct(n.conv, num_output=3, weight_filler=dict(type="xavier"))
n.loss = L.SoftmaxWithLoss(n.fc, n.label)
import tempfile, os
with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
    f.write(str(n.to_proto()))
net = caffe.Net(f.name, caffe.TRAIN)
os.unlink(f.name)
loss = float(net.forward()["loss"])
net.backward()
grad = float(np.abs(net.params["conv"][0].diff).sum())
assert np.isfinite(loss) and loss > 0 and grad > 0, (loss, grad)
print("pycaffe %s OK: loss %.4f, |dW conv| %.4f" % (caffe.__version__, loss, grad))
EOF
}

cuda_check() {  # $1 = prefix, $2 = caffe binary: the architectures in libcaffe, the GPU if any
  local lib objdump elf ptx arch
  lib="$(readlink -f "$1/lib/libcaffe.so")"
  if objdump="$(cuobjdump_bin)"; then
    elf="$("$objdump" --list-elf "$lib" | grep -o 'sm_[0-9]*' | sort -u | xargs)"
    ptx="$("$objdump" --list-ptx "$lib" | grep -o 'sm_[0-9]*' | sort -u | xargs)"
    log "self-check: cuobjdump: libcaffe holds ELF for ${elf:-nothing}, PTX for ${ptx:-nothing}"
    for arch in $ARCH_BIN; do
      case " $elf " in *" sm_$arch "*) ;; *) die "libcaffe.so lacks sm_$arch code (cuobjdump --list-elf: $elf)" ;; esac
    done
  else
    log "self-check: no cuobjdump here: the architecture check is skipped"
  fi
  if nvidia-smi -L >/dev/null 2>&1; then
    log "self-check: caffe device_query -gpu 0"
    "$2" device_query -gpu 0 2>&1 | sed -n 's/.*] //p' | grep -E 'Name|Major|Minor|Total global' || die "caffe device_query failed"
  else
    log "self-check: no GPU driver here (nvidia-smi): device_query is left to the GPU machine"
  fi
}

cached_build_matches() {  # $PREFIX holds a build of what is asked, and --force was not given
  [ "$FORCE" -eq 0 ] && [ -f "$PREFIX/.tinycaffe-build" ] \
    && head -1 "$PREFIX/.tinycaffe-build" | grep -qxF "$(build_stamp)"
}

opencv_tools_main() {  # --opencv-tools: build (or reuse) the anchor build; caffe.env is not touched
  choose_python
  PREFIX="$TINYCAFFE_HOME/caffe-1.0-cpu-opencv"
  if cached_build_matches; then
    log "cached build matches ($PREFIX): nothing to build"
  else
    ensure_build_deps "${BUILD_DEPS[@]}" "${OPENCV_DEPS[@]}"
    build_caffe
  fi
  local tool
  for tool in convert_imageset compute_image_mean; do
    [ -x "$PREFIX/bin/$tool" ] || die "no $PREFIX/bin/$tool after the build"
  done
  ldd "$PREFIX/lib/libcaffe.so" | grep -q 'libopencv_imgcodecs' || die "$PREFIX/lib/libcaffe.so is not linked with OpenCV"
  log "Caffe's tools with OpenCV: $PREFIX/bin (not activated; tinycaffe's Caffe is unchanged)"
}

main() {
  if [ "$OPENCV_TOOLS" -eq 1 ]; then mkdir -p "$TINYCAFFE_HOME"; opencv_tools_main; return; fi
  choose_flavour
  mkdir -p "$TINYCAFFE_HOME"
  choose_python
  local root
  if [ -n "${CAFFE_ROOT:-}" ]; then
    root="$CAFFE_ROOT"
    log "using existing Caffe at CAFFE_ROOT=$root (nothing is built)"
  else
    PREFIX="$TINYCAFFE_HOME/caffe-1.0-$FLAVOUR"
    root="$PREFIX"
    if [ "$FLAVOUR" = cuda ] && [ "$KEEP_ACTIVE" -eq 0 ]; then
      find_cuda
      choose_archs
      log "CUDA $CUDA_VERSION at $CUDA_HOME; architectures sm_${ARCH_BIN// /, sm_} + PTX $ARCH_PTX"
      prepare_cuda_libs
    fi
    if [ "$KEEP_ACTIVE" -eq 1 ]; then
      :  # reused as it is (choose_flavour said so): no toolkit needed to compare a stamp
    elif cached_build_matches; then
      log "cached build matches ($PREFIX): nothing to build"
      # A cache on a machine without Debian's libopenblas0-openmp (removed, or the cache carried
      # over): libcaffe would quietly load the system's pthreads OpenBLAS instead.
      if [ "$FLAVOUR" = cpu ] && ! ldd "$PREFIX/lib/libcaffe.so" 2>/dev/null | grep -q 'openblas-openmp/'; then
        log "libcaffe does not find OpenBLAS's OpenMP build: installing it"
        ensure_build_deps libopenblas0-openmp
      fi
      # The same for oneDNN (patch 0019), without which libcaffe does not load at all.
      if ldd "$PREFIX/lib/libcaffe.so" 2>/dev/null | grep -q 'libdnnl.*not found'; then
        log "libcaffe does not find oneDNN (libdnnl): installing it"
        ensure_build_deps libdnnl-dev
      fi
    else
      [ -f "$PREFIX/.tinycaffe-build" ] && log "cached build differs from what is asked: rebuilding"
      ensure_build_deps
      build_caffe
    fi
  fi
  local caffe_bin pydir
  caffe_bin="$(find_caffe_bin "$root")" || die "no caffe binary under $root (looked in bin/, build/tools/)"
  pydir="$(find_pycaffe_dir "$root")" || die "no pycaffe under $root (looked in lib/python3/dist-packages, python/)"
  if [ -n "${CAFFE_ROOT:-}" ]; then
    # An existing Caffe may be a CUDA build: the tools then accept --gpu.
    if ldd "$caffe_bin" 2>/dev/null | grep -q 'libcudart'; then FLAVOUR=cuda; else FLAVOUR=cpu; fi
    log "existing Caffe flavour: $FLAVOUR"
  fi
  self_check "$caffe_bin" "$pydir"
  ensure_reference_files
  [ "$FLAVOUR" = cuda ] && [ -z "${CAFFE_ROOT:-}" ] && [ "$KEEP_ACTIVE" -eq 0 ] && cuda_check "$root" "$caffe_bin"
  # Machine-readable location, read by setup.sh and tinycaffe.caffe_env.
  printf 'CAFFE_ROOT=%s\nCAFFE_BIN=%s\nPYCAFFE_DIR=%s\nCAFFE_FLAVOUR=%s\n' \
    "$root" "$caffe_bin" "$pydir" "$FLAVOUR" > "$TINYCAFFE_HOME/caffe.env.tmp"
  mv "$TINYCAFFE_HOME/caffe.env.tmp" "$TINYCAFFE_HOME/caffe.env"
  log "caffe binary : $caffe_bin"
  log "pycaffe      : $pydir"
  log "python       : $PYTHON_BIN"
  log "location file: $TINYCAFFE_HOME/caffe.env"
}

main
