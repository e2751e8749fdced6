#!/usr/bin/env bash
# Set up the project's virtual environment (.venv) on a fresh machine from a fresh clone.
# Idempotent: every step checks whether its result is already there and skips itself, so a
# rerun on a finished tree takes a second or two.
#
# usage: scripts/setup-env.sh [--ray | --no-ray] [--no-simd] [--force-simd]
#
#   --ray          also install the Ray extra (ray[data] + pyarrow); `make test` passes it
#   --no-ray       do not install Ray (the default)
#   --no-timm      do not install the timm extra (installed by default, so the timm tests run)
#   --no-simd      keep stock Pillow, do not build pillow-simd
#   --force-simd   retry the pillow-simd build even if an earlier attempt failed
#
# Environment (all optional):
#   PYTHON=python3               interpreter that creates the venv
#   VENV=.venv                   venv location, relative to the repository root
#   WITH_RAY=0|1                 same as --ray / --no-ray
#   WITH_TIMM=1|0                same as --no-timm when 0
#   TIMM_SPECS="timm==1.0.30 ..." the timm extra and each of its dependencies, installed with
#                                --no-deps (default: TIMM_SPECS below; the same pins on both stacks)
#   WITH_SIMD=1|0                same as --no-simd when 0
#   PILLOW_SIMD_SPEC=...         pip requirement for pillow-simd (default pillow-simd==12.1.1.post0)
#   RAY_SPEC=...                 pip requirement for Ray (default ray[data])
#   PILLOW_FEATURES="jpg ..."    codecs pillow-simd must have, else stock Pillow stays
#   PILLOW_SIMD_WHEELS=DIR       where built pillow-simd wheels are kept
#                                (default ~/.cache/imagenet-engine/pillow-simd-{avx2,sse4})
#   SKIP_APT=1                   never call apt-get
#   REQUIREMENTS=FILE            the pins to install (default requirements-test.txt;
#                                `make test-compat` gives requirements-compat.txt)
#   AARCH64_TORCH="torch==2.9.1 torchvision==0.24.1"
#                                on aarch64, replace requirements-test.txt's torch and
#                                torchvision pins (x86-64 CUDA builds that do not exist there)
#
# On aarch64 (Kunpeng and other ARM hosts) pillow-simd is not attempted (it has SSE4/AVX2
# code only; its ARM port was never merged): stock Pillow stays, with a notice. The region
# decoder's resize there is its NEON path (NEON is part of aarch64's base ISA).
#
# Order matters because of the Pillow / pillow-simd conflict: both ship the `PIL` package
# under different distribution names, and torchvision depends on `pillow`, so any pip
# command that resolves torchvision's dependencies puts stock Pillow back over pillow-simd.
# Hence: test pins (pulls stock Pillow) -> Ray -> this package with --no-deps -> swap
# Pillow for pillow-simd last -> verify.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
WITH_RAY=${WITH_RAY:-0}
WITH_TIMM=${WITH_TIMM:-1}
# timm 1.0.30: the newest that installs on Python 3.9 (1.0.31 needs 3.10). Each dependency of
# timm and huggingface_hub is named, so pip resolves nothing (hf-xet is left out: huggingface_hub
# imports it only for Xet-stored downloads).
TIMM_SPECS=${TIMM_SPECS:-timm==1.0.30 huggingface_hub==0.36.0 safetensors==0.6.2 tqdm>=4.42.1 pyyaml>=5.1 fsspec>=2023.5.0 filelock packaging requests typing-extensions}
WITH_SIMD=${WITH_SIMD:-1}
FORCE_SIMD=${FORCE_SIMD:-0}
PILLOW_SIMD_SPEC=${PILLOW_SIMD_SPEC:-pillow-simd==12.1.1.post0}
RAY_SPEC=${RAY_SPEC:-ray[data]}
# Codecs pillow-simd must have to replace stock Pillow (names as PIL.features.check takes).
PILLOW_FEATURES=${PILLOW_FEATURES:-jpg zlib libtiff webp}
SKIP_APT=${SKIP_APT:-0}
REQUIREMENTS=${REQUIREMENTS:-requirements-test.txt}
AARCH64_TORCH=${AARCH64_TORCH:-torch==2.9.1 torchvision==0.24.1}
ARCH=$(uname -m)

for arg in "$@"; do
    case "$arg" in
        --ray) WITH_RAY=1 ;;
        --no-ray) WITH_RAY=0 ;;
        --no-timm) WITH_TIMM=0 ;;
        --no-simd) WITH_SIMD=0 ;;
        --force-simd) FORCE_SIMD=1 ;;
        -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
        *) echo "setup-env: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1

PY="$ROOT/$VENV/bin/python"
LOGDIR="$ROOT/$VENV/setup-logs"
SIMD_FAILED="$ROOT/$VENV/.pillow-simd-failed"   # reason of the last failed build
SIMD_FLAGS="$ROOT/$VENV/.pillow-simd-cc"        # CC the installed pillow-simd was built with
EDITABLE_STAMP="$ROOT/$VENV/.editable-install"  # hash of the packaging metadata last installed

start_ts=$(date +%s)
say() { printf 'setup-env: %s\n' "$*"; }
notice() { printf 'setup-env: NOTICE: %s\n' "$*"; }

[[ -f "$REQUIREMENTS" ]] || { say "REQUIREMENTS=$REQUIREMENTS: no such file (give a pip requirements file)" >&2; exit 2; }
if [[ "$ARCH" == aarch64 && "$WITH_SIMD" == 1 ]]; then
    notice "aarch64: pillow-simd is x86-only (SSE4/AVX2; its ARM port was never merged), keeping stock Pillow; the region decoder resizes with NEON"
    WITH_SIMD=0
fi

# Run pip quietly, keeping its full output in a log; show the tail when it fails.
pip_logged() {
    local name=$1; shift
    local log="$LOGDIR/$name.log"
    if "$PY" -m pip "$@" >"$log" 2>&1; then
        return 0
    else
        local rc=$?
        grep -v "^WARNING: Location 'file://" "$log" | tail -n 25 | sed 's/^/    | /' >&2 || true
        say "pip step '$name' failed (rc=$rc), full log: $log" >&2
        return "$rc"
    fi
}

# True when every requirement given (PEP 508 strings, markers allowed) is installed in the venv.
reqs_satisfied() {
    "$PY" - "$@" <<'PYEOF'
import sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
for line in sys.argv[1:]:
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate():
        continue
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        sys.exit(1)
sys.exit(0)
PYEOF
}

# Prints "simd", "stock" or "none" for the PIL the venv imports.
pil_flavour() {
    "$PY" - <<'PYEOF'
from importlib import metadata
def ver(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
try:
    import PIL
except ImportError:
    print("none"); raise SystemExit
simd, stock = ver("pillow-simd"), ver("pillow")
# Both installed means one overwrote the other's files: treat it as broken (stock).
if simd and not stock and PIL.__version__ == simd:
    print("simd")
else:
    print("stock")
PYEOF
}

# --------------------------------------------------------------------------------------
# 1. System build headers (needed to compile pillow-simd). libtiff and libwebp count as
#    required: stock Pillow wheels have TIFF and WebP, the tests use both, and a
#    pillow-simd built without them is rejected in step 6.
# --------------------------------------------------------------------------------------
have_header() {  # have_header HEADER [extra cc flags...]
    local h=$1; shift
    command -v cc >/dev/null 2>&1 || return 1
    printf '#include <%s>\n' "$h" | cc -E -x c "$@" - >/dev/null 2>&1
}

missing=()
if [[ "$WITH_SIMD" == 1 ]]; then
    py_include=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    command -v cc >/dev/null 2>&1 || missing+=(gcc)
    have_header Python.h "-I$py_include" || missing+=(python3-dev)
    have_header jpeglib.h || missing+=(libjpeg)
    have_header zlib.h || missing+=(zlib1g-dev)
    have_header png.h || missing+=(libpng-dev)
    have_header tiffio.h || missing+=(libtiff-dev)
    have_header webp/decode.h || missing+=(libwebp-dev)
fi

if ((${#missing[@]} == 0)); then
    say "system build headers present (or not needed), skipping apt"
elif [[ "$SKIP_APT" == 1 ]]; then
    notice "missing build prerequisites (${missing[*]}) and SKIP_APT=1; the pillow-simd build may fail"
elif [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    notice "missing build prerequisites (${missing[*]}); not root or no apt-get, so not installing them; the pillow-simd build may fail"
else
    say "installing system build prerequisites via apt: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt_ok=1
    timeout 600 apt-get update -qq >/dev/null 2>&1 || apt_ok=0
    if ((apt_ok)); then
        pkgs=()
        for m in "${missing[@]}"; do
            if [[ "$m" == libjpeg ]]; then
                if apt-cache show libjpeg62-turbo-dev >/dev/null 2>&1; then
                    pkgs+=(libjpeg62-turbo-dev)
                else
                    pkgs+=(libjpeg-dev)
                fi
            else
                pkgs+=("$m")
            fi
        done
        timeout 900 apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 || apt_ok=0
        # Nice to have (colour management, JPEG 2000, fonts in Pillow); never fatal.
        timeout 600 apt-get install -y -qq --no-install-recommends liblcms2-dev libopenjp2-7-dev libfreetype-dev \
            >/dev/null 2>&1 || notice "optional liblcms2-dev/libopenjp2-7-dev/libfreetype-dev not installed"
    fi
    if ((apt_ok)); then
        say "apt: installed ${pkgs[*]}"
    else
        notice "apt-get failed to install ${missing[*]}; continuing, the pillow-simd build may fail"
    fi
fi

# --------------------------------------------------------------------------------------
# 2. Virtual environment
# --------------------------------------------------------------------------------------
if [[ -x "$PY" ]] && "$PY" -c 'import sys, pip' >/dev/null 2>&1; then
    say "reusing $VENV ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
else
    if [[ -e "$VENV" ]]; then say "$VENV is broken, recreating it"; rm -rf "$VENV"; fi
    say "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
mkdir -p "$LOGDIR"

# Build tooling inside the venv: editable installs and the pillow-simd build run without
# build isolation, so they use these. pillow-simd 12.x needs setuptools>=77 and pybind11.
BUILD_REQS=("setuptools>=77" "wheel" "pybind11")
if reqs_satisfied "${BUILD_REQS[@]}"; then
    say "build tooling present"
else
    say "installing build tooling: ${BUILD_REQS[*]}"
    pip_logged build-tools install "${BUILD_REQS[@]}"
fi

# --------------------------------------------------------------------------------------
# 3. Test pins (torch, torchvision, pytest, ...)
# --------------------------------------------------------------------------------------
mapfile -t TEST_REQS < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^[[:space:]]*$/d' "$REQUIREMENTS")
if [[ "$ARCH" == aarch64 && "$REQUIREMENTS" == requirements-test.txt ]]; then
    # requirements-test.txt pins x86-64 CUDA builds; PyPI's aarch64 CPU builds are these
    kept=()
    for r in "${TEST_REQS[@]}"; do
        case "$r" in torch==*|torchvision==*) ;; *) kept+=("$r") ;; esac
    done
    read -r -a arm_pins <<<"$AARCH64_TORCH"
    TEST_REQS=("${arm_pins[@]}" "${kept[@]}")
    notice "aarch64: installing ${arm_pins[*]} in place of requirements-test.txt's torch pins"
fi
if reqs_satisfied "${TEST_REQS[@]}"; then
    say "test requirements already satisfied"
else
    say "installing $REQUIREMENTS (a fresh venv pulls torch: a few minutes)"
    t0=$(date +%s)
    pip_logged requirements install "${TEST_REQS[@]}"
    say "requirements installed in $(($(date +%s) - t0))s"
fi

# --------------------------------------------------------------------------------------
# 4. Ray extra (optional; failures are not fatal, Ray tests then skip)
# --------------------------------------------------------------------------------------
if [[ "$WITH_RAY" == 1 ]]; then
    if reqs_satisfied "$RAY_SPEC" pyarrow; then
        say "Ray already installed"
    else
        say "installing Ray extra ($RAY_SPEC, pyarrow)"
        t0=$(date +%s)
        if pip_logged ray install "$RAY_SPEC" pyarrow; then
            say "Ray installed in $(($(date +%s) - t0))s"
        else
            notice "Ray install failed; Ray tests will be skipped (log: $LOGDIR/ray.log)"
        fi
    fi
fi

# --------------------------------------------------------------------------------------
# 4b. timm extra (timm:ARCH.TAG models), each package with --no-deps: timm depends on
#     torchvision, and a resolving install could put stock Pillow back over pillow-simd.
#     Failures are not fatal: the timm tests then skip with the reason.
# --------------------------------------------------------------------------------------
if [[ "$WITH_TIMM" == 1 ]]; then
    read -r -a timm_specs <<<"$TIMM_SPECS"
    if reqs_satisfied "${timm_specs[@]}"; then
        say "timm extra already installed"
    elif pip_logged timm install --no-deps "${timm_specs[@]}"; then
        say "timm extra installed (${timm_specs[0]})"
    else
        notice "timm extra install failed; timm tests will be skipped (log: $LOGDIR/timm.log)"
    fi
fi

# --------------------------------------------------------------------------------------
# 5. This package, editable, without dependencies (they are installed above; letting pip
#    resolve them would reinstall stock Pillow over pillow-simd via torchvision)
# --------------------------------------------------------------------------------------
meta_hash=$(cat setup.cfg pyproject.toml setup.py 2>/dev/null | sha256sum | cut -d' ' -f1)
if [[ -f "$EDITABLE_STAMP" && "$(cat "$EDITABLE_STAMP")" == "$meta_hash" ]] \
    && "$PY" -c 'from importlib import metadata; metadata.version("imagenet-engine")' >/dev/null 2>&1; then
    say "imagenet-engine already installed (editable)"
else
    say "installing imagenet-engine in editable mode (--no-deps)"
    pip_logged editable install --no-deps --no-build-isolation -e .
    echo "$meta_hash" >"$EDITABLE_STAMP"
fi

# --------------------------------------------------------------------------------------
# 6. pillow-simd in place of Pillow
#    The wheel is built first (while stock Pillow stays importable), kept in a per-user
#    cache keyed by the compiler flags, and only then swapped in, so a fresh clone on the
#    same machine (CI) installs it in seconds and a failed build leaves stock Pillow alone.
# --------------------------------------------------------------------------------------
cc_cmd="cc"
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then cc_cmd="cc -mavx2"; fi
# The cache key names the SIMD level and the optional codec headers found, so a wheel
# built before libtiff/libwebp/lcms2 headers were installed is never picked up again.
cc_tag=sse4
if [[ "$cc_cmd" == *-mavx2* ]]; then cc_tag=avx2; fi
for hdr in tiffio.h:tiff webp/decode.h:webp lcms2.h:lcms2; do
    if have_header "${hdr%%:*}"; then cc_tag+="-${hdr##*:}"; fi
done
simd_key="$PILLOW_SIMD_SPEC $cc_tag"
SIMD_WHEELS=${PILLOW_SIMD_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/imagenet-engine/pillow-simd-$cc_tag}

simd_failed() {  # $1 = reason
    printf '%s\n%s\n' "$simd_key" "$1" >"$SIMD_FAILED"
    notice "pillow-simd fast path unavailable: $1; using stock Pillow (log: $LOGDIR/pillow-simd.log)"
}
ensure_stock_pillow() {  # (re)install stock Pillow unless it is cleanly installed
    if [[ "$(pil_flavour)" != stock ]] || "$PY" -c 'from importlib import metadata; metadata.version("pillow-simd")' >/dev/null 2>&1; then
        "$PY" -m pip uninstall -y pillow-simd pillow >/dev/null 2>&1 || true
        pip_logged pillow-stock install pillow
    fi
    rm -f "$SIMD_FLAGS"
}
cached_simd_wheel() {  # true when the cache holds a wheel for this spec and interpreter
    "$PY" -m pip install --dry-run --ignore-installed --no-deps --no-index \
        --find-links "$SIMD_WHEELS" "$PILLOW_SIMD_SPEC" >/dev/null 2>&1
}

pil_lacking() {  # prints the PIL features in PILLOW_FEATURES that the installed PIL lacks
    PILLOW_FEATURES="$PILLOW_FEATURES" "$PY" -c '
import os, PIL.features as f
print(" ".join(x for x in os.environ["PILLOW_FEATURES"].split() if not f.check(x)))'
}

flavour=$(pil_flavour)
if [[ "$WITH_SIMD" != 1 ]]; then
    say "pillow-simd disabled (--no-simd); keeping $flavour Pillow"
    if [[ "$flavour" == none ]]; then ensure_stock_pillow; fi
elif [[ "$flavour" == simd && -z "$(pil_lacking)" ]]; then
    say "pillow-simd already installed"
elif [[ -f "$SIMD_FAILED" && "$FORCE_SIMD" != 1 && "$(head -n 1 "$SIMD_FAILED")" == "$simd_key" ]]; then
    notice "pillow-simd fast path unavailable: earlier attempt failed ($(tail -n 1 "$SIMD_FAILED")); using stock Pillow (rerun with --force-simd to retry)"
    ensure_stock_pillow
else
    t0=$(date +%s)
    built=1
    if cached_simd_wheel; then
        say "using cached $PILLOW_SIMD_SPEC wheel from $SIMD_WHEELS"
    else
        say "building $PILLOW_SIMD_SPEC from source with CC=\"$cc_cmd\" (1-3 minutes, cached afterwards)"
        mkdir -p "$SIMD_WHEELS"
        tmpw=$(mktemp -d)
        if CC="$cc_cmd" pip_logged pillow-simd wheel --no-cache-dir --no-deps --no-build-isolation \
            --no-binary pillow-simd -w "$tmpw" "$PILLOW_SIMD_SPEC"; then
            mv "$tmpw"/pillow_simd-*.whl "$SIMD_WHEELS"/
        else
            built=0
            reason=$(grep -v "^WARNING: Location 'file://" "$LOGDIR/pillow-simd.log" 2>/dev/null \
                | grep -vE 'subprocess-exited-with-error|Failed (building|to build)|originates from a subprocess|finished with status' \
                | grep -iE 'error|exception|fatal|no matching' | head -n 1 | sed 's/^[[:space:]]*//' | cut -c1-160 || true)
            simd_failed "build failed (${reason:-see log})"
            ensure_stock_pillow
        fi
        rm -rf "$tmpw"
    fi
    if ((built)); then
        # Swap: the window without an importable PIL is one uninstall + one local install.
        "$PY" -m pip uninstall -y pillow pillow-simd >/dev/null 2>&1 || true
        if pip_logged pillow-simd-install install --no-deps --no-index --find-links "$SIMD_WHEELS" "$PILLOW_SIMD_SPEC"; then
            lacking=$(pil_lacking)
            if [[ -z "$lacking" ]]; then
                echo "$cc_cmd" >"$SIMD_FLAGS"
                rm -f "$SIMD_FAILED"
                say "pillow-simd installed in $(($(date +%s) - t0))s"
            else
                # Do not keep a wheel that lacks codecs: a later build may have the headers.
                rm -f "$SIMD_WHEELS"/pillow_simd-*.whl
                simd_failed "it was built without: $lacking (missing -dev headers?)"
                ensure_stock_pillow
            fi
        else
            simd_failed "the built pillow-simd wheel did not install"
            ensure_stock_pillow
        fi
    fi
fi

# --------------------------------------------------------------------------------------
# 6b. The JPEG region decoder (preprocess/_jpegregion.c, loaded with ctypes): built against
#     the system's libjpeg-turbo; both decode modes use it to decode only the window the crop
#     needs, and without it decode whole images (slower; exact mode's pixels are the same, fast
#     mode's the same up to rounding). The file name carries the source's hash, so a changed
#     source is rebuilt here and a stale build is never loaded.
# --------------------------------------------------------------------------------------
if "$PY" -m preprocess.native --check >/dev/null 2>&1; then
    say "JPEG region decoder already built"
elif "$PY" -m preprocess.native --build >"$LOGDIR/jpegregion.log" 2>&1; then
    say "JPEG region decoder built ($("$PY" -m preprocess.native --check 2>&1))"
else
    notice "JPEG region decoder not built ($(tail -n 1 "$LOGDIR/jpegregion.log" | cut -c1-200)); JPEGs are decoded whole instead (slower)"
fi

# --------------------------------------------------------------------------------------
# 7. Verify and summarise
# --------------------------------------------------------------------------------------
"$PY" -c '
import PIL.Image, PIL.features, torchvision
assert PIL.features.check("jpg"), "Pillow was built without JPEG support"
' || { say "verification failed: PIL.Image / torchvision / JPEG support"; exit 1; }

simd_cc=""
if [[ -f "$SIMD_FLAGS" ]]; then simd_cc=$(cat "$SIMD_FLAGS"); fi
SIMD_CC="$simd_cc" "$PY" - <<'PYEOF'
import os, platform
from importlib import metadata

def ver(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

import PIL, PIL.features
cc = os.environ.get("SIMD_CC", "")
if ver("pillow-simd") and not ver("pillow"):
    pil = f"pillow-simd {PIL.__version__} ({'AVX2' if '-mavx2' in cc else 'SSE4'})"
else:
    pil = f"Pillow {PIL.__version__} (stock, no SIMD)"
jpeg = PIL.features.version("jpg")
codecs = " ".join(c for c in ("jpg", "zlib", "libtiff", "webp", "jpg_2000", "littlecms2", "freetype2", "avif")
                  if PIL.features.check(c))
turbo = PIL.features.version_feature("libjpeg_turbo")
rows = [
    ("python", platform.python_version()),
    ("torch", ver("torch") or "MISSING"),
    ("torchvision", ver("torchvision") or "MISSING"),
    ("PIL", f"{pil}, " + (f"libjpeg-turbo {turbo}" if turbo else f"libjpeg {jpeg}")),
    ("PIL codecs", codecs),
    ("numpy", ver("numpy") or "MISSING"),
    ("uvloop", ver("uvloop") or "not installed"),
    ("simplejpeg", ver("simplejpeg") or "not installed"),
    ("region decoder", __import__("preprocess.jpegregion", fromlist=["status"]).status()),
    ("pyarrow", ver("pyarrow") or "not installed"),
    ("ray", ver("ray") or "not installed"),
    ("timm", ver("timm") or "not installed"),
    ("imagenet-engine", ver("imagenet-engine") or "not installed"),
]
print("setup-env: summary")
for k, v in rows:
    print(f"  {k:<16} {v}")
PYEOF
say "done in $(($(date +%s) - start_ts))s"
