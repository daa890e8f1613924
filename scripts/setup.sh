#!/usr/bin/env bash
# Idempotent set-up: Debian packages + Caffe (scripts/install_caffe.sh), the
# virtual environment .venv/ with tinycaffe installed (pip install -e .), and
# pycaffe importable from it. A second run changes nothing and takes seconds.
#
#   scripts/setup.sh [--cpu | --cuda [--arch "80 90"] [--no-cudnn]] [--force]
#   (flags go to install_caffe.sh; no flavour: keep the active one, else CPU)
#
# Environment: PYTHON (interpreter for the venv, default python3), TINYCAFFE_HOME,
# CAFFE_SRC, CAFFE_ROOT (see scripts/install_caffe.sh).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
# CI runners and cron may start without HOME: take the account's home directory then.
HOME="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
export HOME
TINYCAFFE_HOME="${TINYCAFFE_HOME:-$HOME/.cache/tinycaffe}"
export TINYCAFFE_HOME

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    local py="${PYTHON:-python3}"
    command -v "$py" >/dev/null || die "no $py found; set PYTHON=/path/to/python3 (3.9 or newer)"
    if ! "$py" -m venv "$VENV" 2>/dev/null; then
      # Debian's python3 needs python3-venv for `-m venv`.
      [ "$(id -u)" -eq 0 ] || die "python3 -m venv failed; as root run: apt-get install -y python3-venv"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      "$py" -m venv "$VENV"
    fi
    log "created $VENV ($("$VENV/bin/python" --version))"
  fi
}

ensure_python_deps() {
  # Skip pip entirely when requirements.txt and setup.py are unchanged since the last install.
  local stamp="$VENV/.tinycaffe-deps" want
  want="$(cat "$REPO/requirements.txt" "$REPO/setup.py" | sha256sum | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
      && "$VENV/bin/python" -c "import tinycaffe" >/dev/null 2>&1; then
    log "python packages up to date"
    return
  fi
  log "installing python packages (requirements.txt) and tinycaffe (editable)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REPO/requirements.txt"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$REPO"
  printf '%s\n' "$want" > "$stamp"
}

link_caffe() {
  # install_caffe.sh records where Caffe is; make the venv see it.
  local env_file="$TINYCAFFE_HOME/caffe.env"
  [ -f "$env_file" ] || die "$env_file missing after install_caffe.sh"
  local pydir bin site
  pydir="$(sed -n 's/^PYCAFFE_DIR=//p' "$env_file")"
  bin="$(sed -n 's/^CAFFE_BIN=//p' "$env_file")"
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  printf '%s\n' "$pydir" > "$site/tinycaffe-pycaffe.pth"
  ln -sf "$bin" "$VENV/bin/caffe"
  local tool
  for tool in compute_image_mean upgrade_net_proto_text upgrade_solver_proto_text; do
    [ -x "$(dirname "$bin")/$tool" ] && ln -sf "$(dirname "$bin")/$tool" "$VENV/bin/$tool"
  done
  "$VENV/bin/python" -c "import os; os.environ['GLOG_minloglevel']='2'; import caffe" \
    || die "pycaffe does not import from $VENV (pth: $site/tinycaffe-pycaffe.pth)"
}

# Debian packages of the real servers the tests start and stop themselves: PostgreSQL (the
# sweeps' RDB storage, tests/test_sweep.py), and munge + Slurm (a one-node cluster that runs
# scripts/sweep_slurm.sh's job arrays, tests/test_slurm.py). Without root they are not
# installed and those tests are skipped with the reason.
SERVICE_PACKAGES=(postgresql munge slurmctld slurmd slurm-client)
ensure_service_packages() {
  command -v dpkg-query >/dev/null || return 0
  local missing=() p
  for p in "${SERVICE_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    log "not root: ${missing[*]} not installed (the PostgreSQL and Slurm sweep tests will be skipped; as root: apt-get install -y ${missing[*]})"
    return 0
  fi
  log "installing Debian packages for the tests' servers: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # (Debian may start the packages' own PostgreSQL cluster, munged and Slurm daemons; the tests never
  # use them: they start theirs in a temp folder, on their own socket and ports.)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

main() {
  case "${1:-}" in -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
  local arg
  for arg in "$@"; do  # the bench's anchor build is not a Caffe for tinycaffe: never set it up as one
    [ "$arg" != --opencv-tools ] || die "--opencv-tools is an option of scripts/install_caffe.sh (the bench's anchor build; setup.sh sets up tinycaffe's own Caffe)"
  done
  ensure_venv
  ensure_service_packages
  ensure_python_deps
  "$REPO/scripts/install_caffe.sh" --python "$VENV/bin/python" "$@"
  link_caffe
  log "ready. Use the venv:    source .venv/bin/activate   (puts caffe and compute_image_mean on PATH)"
  log "or call it directly:   .venv/bin/python tools/make_sample_data.py data/sample/tiny-imagenet-200"
}

main "$@"
