#!/usr/bin/env bash
# Build BVLC Caffe 1.0 + pycaffe from Debian's bullseye source package into a
# versioned prefix outside the repo, then self-check it.
#
#   scripts/install_caffe.sh [--cpu|--cuda] [--python PY] [--jobs N] [--force]
#
# Environment:
#   TINYCAFFE_HOME  cache root (default $HOME/.cache/tinycaffe); the build lands in
#                   $TINYCAFFE_HOME/caffe-1.0-cpu
#   CAFFE_SRC       use this Caffe source tree instead of `apt-get source`
#                   (it is copied, never patched in place)
#   CAFFE_ROOT      use an existing Caffe install/build; nothing is built
#   CAFFE_JOBS      parallel compile jobs (default: nproc)
#
# Idempotent: a prefix whose build stamp matches (flavour, Python X.Y, patches)
# is reused. A failed build leaves no prefix behind: the install is staged with
# DESTDIR and renamed into place only after it completed.
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
  libhdf5-dev liblmdb-dev libsnappy-dev libopenblas-dev)
# Modules pycaffe imports at `import caffe` (plus numpy for the build itself).
PY_MODULES=(numpy six skimage scipy google.protobuf)

log() { printf '[install_caffe] %s\n' "$*"; }
die() { printf '[install_caffe] error: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

FLAVOUR=""        # cpu | cuda; empty = auto (cuda when nvcc is found)
PYTHON_BIN="${PYTHON:-}"
JOBS="${CAFFE_JOBS:-$(nproc)}"
FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) FLAVOUR=cpu ;;
    --cuda) FLAVOUR=cuda ;;
    --python) PYTHON_BIN="${2:?--python needs an interpreter path}"; shift ;;
    --jobs) JOBS="${2:?--jobs needs a number}"; shift ;;
    --force) FORCE=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (valid: --cpu, --cuda, --python PY, --jobs N, --force, --help)" ;;
  esac
  shift
done

choose_flavour() {
  if [ "$FLAVOUR" = cuda ]; then
    die "the CUDA flavour (caffe-1.0-cuda) is not ready yet: it is tracked in the GPU issue. Use --cpu for now."
  fi
  if [ -z "$FLAVOUR" ] && command -v nvcc >/dev/null 2>&1; then
    log "note: nvcc found, but the CUDA flavour is not ready yet (GPU issue); building the CPU flavour."
  fi
  FLAVOUR=cpu
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

# ---------------------------------------------------------------- system packages
ensure_build_deps() {
  local missing=() p
  for p in "${BUILD_DEPS[@]}"; do
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

apply_patches() {  # $1 = source tree
  local p
  for p in "$REPO"/scripts/patches/*.patch; do
    if patch -d "$1" -p1 -R --dry-run -s -f < "$p" >/dev/null 2>&1; then
      log "patch already applied: $(basename "$p")"
    else
      patch -d "$1" -p1 -s -f < "$p" || die "patch $(basename "$p") does not apply to this Caffe source"
      log "patched: $(basename "$p")"
    fi
  done
}

# ---------------------------------------------------------------- build
build_stamp() {  # what must match for a cached prefix to be reused
  printf 'flavour=%s python=%s caffe=%s patches=%s\n' "$FLAVOUR" "$PY_VERSION" \
    "${CAFFE_SRC:-debian-$CAFFE_DEB_VERSION}" "$(cat "$REPO"/scripts/patches/*.patch | sha256sum | cut -c1-16)"
}

build_caffe() {
  BUILD_WORK="$(mktemp -d "$TINYCAFFE_HOME/build-$FLAVOUR.XXXXXX")"
  local work="$BUILD_WORK"
  # Remove the scratch dir whatever happens; the prefix only appears on success.
  trap 'rm -rf "$BUILD_WORK"' EXIT
  local t0=$SECONDS
  fetch_source "$work"
  apply_patches "$work/src"
  mkdir -p "$work/build"
  log "configuring (python $PYTHON_BIN, $JOBS jobs)"
  # shellcheck disable=SC2046
  (cd "$work/build" && cmake ../src -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_INSTALL_PREFIX="$PREFIX" \
      -DCPU_ONLY=ON -DUSE_OPENCV=OFF -DUSE_LEVELDB=OFF -DUSE_LMDB=ON -DBLAS=Open \
      -DBUILD_python=ON -Dpython_version=3 -DBUILD_docs=OFF -DBUILD_matlab=OFF \
      -DPYTHON_EXECUTABLE="$PYTHON_BIN" $(python_cmake_args) > "$work/cmake.log" 2>&1) \
    || { tail -30 "$work/cmake.log" >&2; die "cmake configure failed (log above)"; }
  log "compiling (this takes about 3 minutes on 2 cores)"
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
  PYTHONPATH="$pydir${PYTHONPATH:+:$PYTHONPATH}" GLOG_minloglevel=2 "$PYTHON_BIN" - <<'EOF'
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

main() {
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
    if [ "$FORCE" -eq 0 ] && [ -f "$PREFIX/.tinycaffe-build" ] \
        && head -1 "$PREFIX/.tinycaffe-build" | grep -qxF "$(build_stamp)"; then
      log "cached build matches ($PREFIX): nothing to build"
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
