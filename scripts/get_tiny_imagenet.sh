#!/usr/bin/env bash
# Download the official tiny-imagenet-200.zip, check it, unzip it under DEST
# (default data/), and print the next command. Offline: put the zip at
# DEST/tiny-imagenet-200.zip first (it is used as it is), or set TINY_IMAGENET_URL.
#
#   scripts/get_tiny_imagenet.sh [DEST]
#
# Environment:
#   TINY_IMAGENET_URL  where to fetch from (default: CS231n's, http://cs231n.stanford.edu/tiny-imagenet-200.zip);
#                      file:// URLs work, e.g. for a local copy or a mirror
#   TINY_IMAGENET_MD5  expected md5 of the zip (default: the official archive's);
#                      set to "skip" for a zip you made yourself
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${1:-}" in
  -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) printf '[get_tiny_imagenet] error: unknown option %s (valid: DEST, --help)\n' "$1" >&2; exit 2 ;;
esac
DEST="${1:-$REPO/data}"
URL="${TINY_IMAGENET_URL:-http://cs231n.stanford.edu/tiny-imagenet-200.zip}"
MD5="${TINY_IMAGENET_MD5:-90528d7ca1a48142e341f4ef8d21d0de}"  # the official 248 MB zip

log() { printf '[get_tiny_imagenet] %s\n' "$*"; }
die() { printf '[get_tiny_imagenet] error: %s\n' "$*" >&2; exit 1; }

command -v curl >/dev/null || die "curl not found (apt-get install curl)"
PY="$REPO/.venv/bin/python"; [ -x "$PY" ] || PY="$(command -v python3)" || die "python3 not found"
mkdir -p "$DEST"
[ -e "$DEST/tiny-imagenet-200" ] && die "$DEST/tiny-imagenet-200 exists; remove it first to download again"

ZIP="$DEST/tiny-imagenet-200.zip"
if [ ! -f "$ZIP" ]; then
  log "downloading $URL"
  curl -fL --retry 3 --connect-timeout 20 -o "$ZIP.part" "$URL" || { rm -f "$ZIP.part"
    die "download failed: $URL (offline, or the address moved?). Put tiny-imagenet-200.zip at $ZIP and run this again, or set TINY_IMAGENET_URL to a copy (file:///path/to/tiny-imagenet-200.zip works)"; }
  mv "$ZIP.part" "$ZIP"
fi
if [ "$MD5" != skip ]; then
  got="$(md5sum "$ZIP" | cut -d' ' -f1)"
  [ "$got" = "$MD5" ] || die "$ZIP: md5 $got, expected $MD5 (delete it and retry, or set TINY_IMAGENET_MD5)"
fi
# Unzip into a temporary sibling and rename: an interrupted unzip leaves no half dataset.
TMP="$(mktemp -d "$DEST/.tiny-imagenet-unzip.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m zipfile -e "$ZIP" "$TMP" || die "$ZIP: not a valid zip"
[ -f "$TMP/tiny-imagenet-200/wnids.txt" ] || die "$ZIP: no tiny-imagenet-200/wnids.txt inside (not the Tiny ImageNet archive?)"
mv "$TMP/tiny-imagenet-200" "$DEST/tiny-imagenet-200"
log "ready: $DEST/tiny-imagenet-200 ($(wc -l < "$DEST/tiny-imagenet-200/wnids.txt") classes)"
log "next:  .venv/bin/python tools/make_lmdb.py $DEST/tiny-imagenet-200 data/lmdb"
