#!/usr/bin/env bash
# The region decoder on aarch64, tested here by emulation: cross-compile preprocess/_jpegregion.c
# with the test driver tests/native/region_check.c for aarch64, run it under qemu-aarch64 (called
# explicitly: binfmt_misc is not available), and compare its pixels, NEON path and scalar path,
# bit for bit with the x86_64 build's (AVX2/SSE4.1 path and scalar path) on the same JPEGs.
# Exits non-zero, naming the cases, when any two differ. `make check-aarch64` runs it.
#
# usage: scripts/check-aarch64.sh            (PYTHON=.venv/bin/python by default: numpy + Pillow)
#
# Needs Debian's gcc-aarch64-linux-gnu, libjpeg62-turbo-dev:arm64 (multiarch) and qemu-user;
# installs them with apt-get when run as root (SKIP_APT=1: never), else says what to install.
# Both builds use -ffp-contract=off: GCC on aarch64 would otherwise fuse the filter-weight
# arithmetic (double precision) into FMAs, which round differently from x86_64's separate
# multiply and add and could move a weight by one unit of its int16 fixed point (preprocess/
# jpegregion.py builds the decoder with the same flag).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-build/check-aarch64}
SKIP_APT=${SKIP_APT:-0}
CROSS_CC=${CROSS_CC:-aarch64-linux-gnu-gcc}
CFLAGS_CHECK="-O3 -Wall -ffp-contract=off"
QEMU_PREFIX=/usr/aarch64-linux-gnu

say() { printf 'check-aarch64: %s\n' "$*"; }
fail() { printf 'check-aarch64: FAILED: %s\n' "$*" >&2; exit 1; }
start=$(date +%s)

have_tools() {
    command -v "$CROSS_CC" >/dev/null 2>&1 && command -v qemu-aarch64 >/dev/null 2>&1 \
        && [[ -e /usr/lib/aarch64-linux-gnu/libjpeg.so && -e /usr/include/aarch64-linux-gnu/jconfig.h ]] \
        && command -v cc >/dev/null 2>&1 && printf '#include <jpeglib.h>\n' | cc -E -x c - >/dev/null 2>&1
}

if ! have_tools; then
    pkgs="gcc gcc-aarch64-linux-gnu libc6-dev-arm64-cross libjpeg62-turbo-dev libjpeg62-turbo-dev:arm64 qemu-user"
    if [[ "$SKIP_APT" == 1 || $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        fail "missing cross tools; as root run: dpkg --add-architecture arm64 && apt-get update && apt-get install $pkgs"
    fi
    say "installing the cross toolchain, arm64 libjpeg-turbo and qemu-user via apt (first run only)"
    export DEBIAN_FRONTEND=noninteractive
    dpkg --add-architecture arm64
    timeout 600 apt-get update -qq >/dev/null 2>&1 || fail "apt-get update failed (dpkg --add-architecture arm64 done)"
    # shellcheck disable=SC2086
    timeout 900 apt-get install -y -qq --no-install-recommends $pkgs >/dev/null 2>&1 \
        || fail "apt-get install $pkgs failed; run it by hand to see why"
    have_tools || fail "tools still missing after apt-get install $pkgs"
fi

[[ -x "$PYTHON" ]] || fail "$PYTHON not found: run make setup first, or give PYTHON= (an interpreter with numpy and Pillow)"

mkdir -p "$OUT"
rm -rf "$OUT/jpegs"
"$PYTHON" tests/native/make_jpegs.py "$OUT/jpegs" || fail "making the test JPEGs failed (tests/native/make_jpegs.py)"
mapfile -t files < <(ls "$OUT"/jpegs/*.JPEG "$OUT"/jpegs/*.jpg | sort)
say "${#files[@]} JPEGs in $OUT/jpegs"

# shellcheck disable=SC2086
cc $CFLAGS_CHECK -o "$OUT/region_check-x86_64" tests/native/region_check.c -ljpeg -lm \
    || fail "the x86_64 build of tests/native/region_check.c failed"
# shellcheck disable=SC2086
"$CROSS_CC" $CFLAGS_CHECK -o "$OUT/region_check-aarch64" tests/native/region_check.c -ljpeg -lm \
    || fail "the aarch64 build of tests/native/region_check.c failed (see the compiler's message above)"

run() {  # run NAME CMD...: pixels to $OUT/NAME.bin, the case list to $OUT/NAME.txt, path line to $OUT/NAME.path
    local name=$1; shift
    local t0
    t0=$(date +%s)
    "$@" "$OUT/$name.bin" "${files[@]}" >"$OUT/$name.txt" 2>"$OUT/$name.path" \
        || fail "$name run failed: $(tail -n 3 "$OUT/$name.path")"
    say "$name: $(grep -c . "$OUT/$name.txt") cases, $(grep -c ' rc=0 ' "$OUT/$name.txt") resized," \
        "$(stat -c %s "$OUT/$name.bin") bytes of pixels, $(head -n 1 "$OUT/$name.path" | sed 's/^region_check: //') ($(($(date +%s) - t0))s)"
}
QEMU=(qemu-aarch64 -L "$QEMU_PREFIX")
run x86_64-vector "$OUT/region_check-x86_64"
run x86_64-scalar "$OUT/region_check-x86_64" --scalar
run aarch64-neon "${QEMU[@]}" "$OUT/region_check-aarch64"
run aarch64-scalar "${QEMU[@]}" "$OUT/region_check-aarch64" --scalar

grep -q 'resize path neon' "$OUT/aarch64-neon.path" \
    || fail "the aarch64 run did not take the NEON path ($(head -n 1 "$OUT/aarch64-neon.path")): IE_NEON must be 1 on aarch64 in preprocess/_jpegregion.c"
resized=$(grep -c ' rc=0 ' "$OUT/x86_64-scalar.txt" || true)
(( resized >= 100 )) || fail "only $resized cases resized on x86_64 (expected hundreds): the test JPEGs or the driver are wrong"

bad=0
for name in x86_64-vector aarch64-neon aarch64-scalar; do
    if ! cmp -s "$OUT/x86_64-scalar.txt" "$OUT/$name.txt" || ! cmp -s "$OUT/x86_64-scalar.bin" "$OUT/$name.bin"; then
        bad=1
        printf 'check-aarch64: %s differs from x86_64-scalar (< x86_64-scalar, > %s):\n' "$name" "$name" >&2
        diff "$OUT/x86_64-scalar.txt" "$OUT/$name.txt" | head -n 20 >&2 || true
        cmp "$OUT/x86_64-scalar.bin" "$OUT/$name.bin" >&2 || true
    fi
done
if ((bad)); then
    fail "pixels differ between builds/paths (files in $OUT). Every resize path must compute the scalar" \
        "passes' int32 sums (ie_horizontal/ie_vertical in preprocess/_jpegregion.c): fix the path that differs"
fi
say "OK: x86_64 vector and scalar, aarch64 NEON and scalar: the same pixels, bit for bit ($resized crops) in $(($(date +%s) - start))s"
