#!/usr/bin/env bash
# Pack a built Caffe into one relocatable archive for a machine without Debian's
# -dev packages: the caffe tools, libcaffe, pycaffe, and every shared library they
# need that is not part of the C library (found with ldd), all with RPATH $ORIGIN.
#
#   scripts/pack_caffe.sh [--prefix DIR] [--out FILE] [--with-cuda-libs]
#
#   --prefix DIR       the Caffe install to pack (default: the active one, from
#                      $TINYCAFFE_HOME/caffe.env)
#   --out FILE         the archive (default: dist/caffe-1.0-<flavour>[-sm<archs>].tar.xz)
#   --with-cuda-libs   also pack cuBLAS, cuRAND, cuDNN and NCCL (about 1 GB); by
#                      default they come from the target machine (see below)
#
# On the target: tar xf the archive anywhere, then `source caffe-1.0-<flavour>/env.sh`
# (PATH, PYTHONPATH, and the CUDA libraries of pip's nvidia-* wheels when there) and
# `caffe-1.0-<flavour>/check.sh` (what is missing, if anything). The target needs the
# same Python X.Y for pycaffe (with numpy, six, protobuf), a glibc at least as
# new as MANIFEST.txt says, and for the CUDA flavour a driver for its CUDA version.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOME="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
TINYCAFFE_HOME="${TINYCAFFE_HOME:-$HOME/.cache/tinycaffe}"
MAX_CUDA_MIB=64   # what one device-tool carry allows for the CUDA flavour, one architecture

log() { printf '[pack_caffe] %s\n' "$*"; }
die() { printf '[pack_caffe] error: %s\n' "$*" >&2; exit 1; }

# The C and C++ runtimes and the GPU driver: always the target's own. A copied glibc
# does not work with the target's loader, a copied driver would not match its kernel
# module, and Debian 12's libstdc++ alone would raise the glibc needed from 2.35
# (Ubuntu 22.04) to 2.36; the manifest says which GLIBC/GLIBCXX versions are needed.
SYSTEM_LIBS='^(linux-vdso|ld-linux[-.a-z0-9_]*|libc|libm|libdl|libpthread|librt|libutil|libresolv|libanl|libnss_[a-z]+|libstdc\+\+|libgcc_s|libcuda|libnvidia-[a-z-]+)\.so'
# The big CUDA libraries: from the target unless --with-cuda-libs (cuBLAS alone is 600 MB).
HOST_CUDA_LIBS='^lib(cublas|cublasLt|curand|cudnn[a-z_]*|nccl)\.so'
# Linked by libcaffe for Python layers; an extension module gets these symbols from the
# interpreter that imports it, so only the tools (bin/) load a copy, from lib/python/.
PYTHON_LIB='^libpython3\.[0-9]+\.so'

PREFIX="" OUT="" WITH_CUDA=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="${2:?--prefix needs a directory}"; shift ;;
    --out) OUT="${2:?--out needs a file name}"; shift ;;
    --with-cuda-libs) WITH_CUDA=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown option '$1' (valid: --prefix DIR, --out FILE, --with-cuda-libs, --help)" ;;
  esac
  shift
done

active_prefix() {
  local env_file="$TINYCAFFE_HOME/caffe.env"
  [ -f "$env_file" ] || die "$env_file: missing (build Caffe first: scripts/install_caffe.sh), or pass --prefix"
  sed -n 's/^CAFFE_ROOT=//p' "$env_file"
}

ensure_patchelf() {
  command -v patchelf >/dev/null && return 0
  [ "$(id -u)" -eq 0 ] || die "patchelf is missing; as root run: apt-get install -y patchelf"
  log "installing patchelf (Debian package)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq patchelf >/dev/null \
    || { DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq patchelf >/dev/null; }
}

is_elf() { [ "$(head -c4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]; }

deps_of() {  # $1 = ELF -> "soname path" of every library it loads, resolved by ldd
  ldd "$1" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3} $2 == "=>" && $3 == "not" {print $1, "MISSING"}'
}

copy_tree() {  # the prefix's programs, libcaffe and pycaffe into $STAGE
  mkdir -p "$STAGE/bin" "$STAGE/lib" "$STAGE/python"
  local f
  for f in "$PREFIX"/bin/*; do is_elf "$f" && cp -L "$f" "$STAGE/bin/"; done
  cp -L "$(readlink -f "$PREFIX/lib/libcaffe.so")" "$STAGE/lib/"
  local real; real="$(basename "$(readlink -f "$PREFIX/lib/libcaffe.so")")"
  local soname; soname="$(patchelf --print-soname "$STAGE/lib/$real")"
  [ "$soname" = "$real" ] || ln -s "$real" "$STAGE/lib/$soname"
  ln -s "$real" "$STAGE/lib/libcaffe.so"
  cp -rL "$PYCAFFE/caffe" "$STAGE/python/"
  find "$STAGE/python" -name '__pycache__' -prune -exec rm -rf {} +
  rm -rf "$STAGE/python/caffe/test"
}

collect_libs() {  # every non-system dependency of every ELF into lib/ (ldd lists them transitively)
  local elves=() elf soname path seen=" "
  mapfile -t elves < <(find "$STAGE/bin" "$STAGE/lib" "$STAGE/python" -type f | while read -r f; do is_elf "$f" && echo "$f"; done)
  HOST_LIBS=() MISSING=()
  for elf in "${elves[@]}"; do
    while read -r soname path; do
      case "$seen" in *" $soname "*) continue ;; esac
      seen="$seen$soname "
      if [[ "$soname" =~ $SYSTEM_LIBS ]]; then continue; fi
      if [ "$path" = MISSING ]; then MISSING+=("$soname"); continue; fi
      if [ "$WITH_CUDA" -eq 0 ] && [[ "$soname" =~ $HOST_CUDA_LIBS ]]; then HOST_LIBS+=("$soname"); continue; fi
      [[ "$soname" =~ ^libcaffe ]] && continue
      local dest="$STAGE/lib"
      [[ "$soname" =~ $PYTHON_LIB ]] && { dest="$STAGE/lib/python"; PY_SONAME="$soname"; mkdir -p "$dest"; }
      cp -L "$path" "$dest/$soname"
      chmod u+w "$dest/$soname"
    done < <(deps_of "$elf")
  done
  [ ${#MISSING[@]} -eq 0 ] || die "ldd cannot find ${MISSING[*]} for this build: fix the build before packing it"
}

set_rpaths() {
  local f
  for f in "$STAGE"/bin/*; do
    patchelf --set-rpath '$ORIGIN/../lib:$ORIGIN/../lib/python' "$f"
    # The tools embed Python for Python layers: they load the packed libpython first,
    # and libcaffe's own reference to it is gone (see below).
    [ -n "${PY_SONAME:-}" ] && patchelf --add-needed "$PY_SONAME" "$f"
  done
  for f in "$STAGE"/lib/*.so* "$STAGE"/lib/python/*.so*; do
    [ -L "$f" ] || [ ! -f "$f" ] && continue
    patchelf --set-rpath '$ORIGIN' "$f"
    [ -n "${PY_SONAME:-}" ] && patchelf --remove-needed "$PY_SONAME" "$f"
  done
  while read -r f; do
    patchelf --set-rpath '$ORIGIN/../../lib' "$f"
    [ -n "${PY_SONAME:-}" ] && patchelf --remove-needed "$PY_SONAME" "$f"
  done < <(find "$STAGE/python" -name '*.so')
  # Debug sections are half of a Release libcaffe; the CUDA fatbin is kept by strip.
  find "$STAGE" -type f \( -name '*.so*' -o -path '*/bin/*' \) ! -name '*.py' -exec strip --strip-unneeded {} + 2>/dev/null || true
}

newest_symbol_version() {  # $1 = GLIBC or GLIBCXX: the newest version any packed ELF asks for
  find "$STAGE" -type f \( -name '*.so*' -o -path '*/bin/*' \) -exec objdump -T {} + 2>/dev/null \
    | grep -o "${1}_[0-9][0-9.]*" | sort -u -V | tail -1 | sed "s/^${1}_//"
}

write_env_files() {
  cat > "$STAGE/env.sh" <<'EOF'
# source this file: the packed Caffe on PATH and PYTHONPATH, and the CUDA libraries
# this build expects from the machine (MANIFEST.txt, "from the target") found in the
# nvidia-* pip wheels of the python3 on PATH, when the system has no copy of them.
_caffe_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PATH="$_caffe_here/bin:$PATH"
export PYTHONPATH="$_caffe_here/python${PYTHONPATH:+:$PYTHONPATH}"
if [ -s "$_caffe_here/host-libs.txt" ] && command -v python3 >/dev/null; then
  _caffe_wheel_dirs="$(python3 - "$_caffe_here/host-libs.txt" <<'PY' 2>/dev/null
import glob, os, site, sys
want = set(open(sys.argv[1]).read().split())
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = []
for root in roots:
    for lib in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib"))):
        if want & set(os.listdir(lib)) and lib not in dirs:
            dirs.append(lib)
print(":".join(dirs))
PY
)"
  [ -n "$_caffe_wheel_dirs" ] && export LD_LIBRARY_PATH="$_caffe_wheel_dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  unset _caffe_wheel_dirs
fi
unset _caffe_here
EOF
  cat > "$STAGE/check.sh" <<'EOF'
#!/usr/bin/env bash
# Does the packed Caffe run here? Prints what is missing, exits 1 if anything is.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC1091
source "$here/env.sh"
missing="$(ldd "$here/bin/caffe" "$here/lib/libcaffe.so" 2>/dev/null | awk '/not found/ {print $1}' | sort -u | xargs)"
if [ -n "$missing" ]; then
  echo "check: missing libraries: $missing" >&2
  echo "check: they come from this machine's CUDA (see MANIFEST.txt); e.g. pip install -r $here/cuda-libs.txt" >&2
  exit 1
fi
"$here/bin/caffe" --version || exit 1
echo "check: caffe runs; pycaffe: $(python3 -c 'import caffe; print("imports, NCCL" if caffe.has_nccl() else "imports")' 2>&1 | tail -1)"
EOF
  chmod +x "$STAGE/check.sh"
}

write_manifest() {
  local glibc glibcxx
  glibc="$(newest_symbol_version GLIBC)" glibcxx="$(newest_symbol_version GLIBCXX)"
  {
    echo "packed from: $PREFIX"
    [ -f "$PREFIX/.tinycaffe-build" ] && sed 's/^/build: /' "$PREFIX/.tinycaffe-build"
    echo "needs glibc: $glibc or newer (this machine: $(ldd --version | head -1 | awk '{print $NF}')), libstdc++ with GLIBCXX_$glibcxx"
    echo "python for pycaffe: $(sed -n 's/.*python=\([0-9.]*\).*/\1/p' "$PREFIX/.tinycaffe-build" 2>/dev/null | head -1)"
    echo "packed libraries: $(cd "$STAGE/lib" && find . -name '*.so*' ! -name 'libcaffe*' | sed 's|^\./||' | sort | xargs)"
    echo "from the target: ${HOST_LIBS[*]:-nothing beyond glibc and the GPU driver}"
  } > "$STAGE/MANIFEST.txt"
  printf '%s\n' "${HOST_LIBS[@]}" > "$STAGE/host-libs.txt"
  # The wheel pins the build used, so the target can install the same libraries.
  local major; major="$(sed -n 's/.* cuda=\([0-9]*\)\..*/\1/p' "$PREFIX/.tinycaffe-build" 2>/dev/null | head -1)"
  if [ -n "$major" ] && [ -f "$REPO/scripts/cuda-libs/cu$major.txt" ]; then
    cp "$REPO/scripts/cuda-libs/cu$major.txt" "$STAGE/cuda-libs.txt"
  fi
}

main() {
  [ -n "$PREFIX" ] || PREFIX="$(active_prefix)"
  PREFIX="$(cd "$PREFIX" 2>/dev/null && pwd)" || die "--prefix: no such directory"
  [ -x "$PREFIX/bin/caffe" ] && [ -e "$PREFIX/lib/libcaffe.so" ] \
    || die "$PREFIX: expected bin/caffe and lib/libcaffe.so (an install prefix of scripts/install_caffe.sh)"
  PYCAFFE="$(dirname "$(find "$PREFIX/lib" "$PREFIX/python" -maxdepth 4 -name _caffe.so 2>/dev/null | head -1)")/.."
  [ -f "$PYCAFFE/caffe/__init__.py" ] || die "$PREFIX: no pycaffe (caffe/_caffe.so) inside"
  ensure_patchelf
  local flavour=cpu archs="" name
  if ldd "$PREFIX/lib/libcaffe.so" | grep -q libcudart; then
    flavour=cuda
    archs="$(sed -n 's/.* arch=\([0-9,]*\)+.*/\1/p' "$PREFIX/.tinycaffe-build" 2>/dev/null | head -1 | tr ',' '-')"
  fi
  name="caffe-1.0-$flavour"
  [ -n "$OUT" ] || OUT="$REPO/dist/$name${archs:+-sm$archs}.tar.xz"
  mkdir -p "$(dirname "$OUT")"
  OUT="$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")"
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/pack_caffe.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
  STAGE="$WORK/$name"
  log "packing $PREFIX ($flavour${archs:+, sm_$archs})"
  copy_tree
  collect_libs
  set_rpaths
  write_env_files
  write_manifest
  # Written to a temporary name and renamed when complete.
  (cd "$WORK" && tar -cf - "$name" | xz -T0 -6 > "$OUT.tmp")
  mv "$OUT.tmp" "$OUT"
  local bytes mib
  bytes="$(stat -c %s "$OUT")"
  mib="$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}')"
  log "$(grep '^needs glibc' "$STAGE/MANIFEST.txt")"
  log "from the target: ${HOST_LIBS[*]:-nothing beyond glibc and the GPU driver}"
  log "archive: $OUT ($mib MiB, unpacked $(du -sm "$STAGE" | cut -f1) MiB)"
  if [ "$flavour" = cuda ] && [ "$WITH_CUDA" -eq 0 ] && [ "$bytes" -gt $((MAX_CUDA_MIB * 1048576)) ]; then
    log "warning: over $MAX_CUDA_MIB MiB; build for one architecture (install_caffe.sh --cuda --arch 90) to carry it"
  fi
}

main
